"""What the launcher told this process, read from its environment (torch's queries).

``distrib-run`` (like torchrun) sets ``TORCHELASTIC_RUN_ID`` and ``LOCAL_RANK`` for
every worker; code written for torch asks these two functions instead of reading
the variables itself.
"""

from __future__ import annotations

import os

from .._errors import DistUsageError

__all__ = ["get_node_local_rank", "is_torchelastic_launched"]


def is_torchelastic_launched() -> bool:
    """Whether an elastic launcher (``distrib-run`` or torchrun) started this process."""
    return os.environ.get("TORCHELASTIC_RUN_ID") is not None


def get_node_local_rank(fallback_rank: int | None = None) -> int:
    """This process's rank among the workers of its machine (``LOCAL_RANK``), else
    ``fallback_rank``; neither is a ``DistUsageError`` (a ``RuntimeError``, as torch's)."""
    value = os.environ.get("LOCAL_RANK")
    if value is not None:
        try:
            return int(value)
        except ValueError:
            raise DistUsageError(
                f"get_node_local_rank: LOCAL_RANK={value!r} is not an integer",
                op="get_node_local_rank",
            ) from None
    if fallback_rank is not None:
        return int(fallback_rank)
    raise DistUsageError(
        "get_node_local_rank: LOCAL_RANK is not in the environment (start the job with "
        "distrib-run or torchrun), and no fallback_rank was given",
        op="get_node_local_rank",
    )
