"""distrib as a torch.distributed backend: ``import distrib.torch`` registers ``"distrib"``.

    import distrib.torch  # noqa: F401  (registers the backend)
    torch.distributed.init_process_group("distrib")  # env://, under distrib-run or torchrun

torch's collectives on CPU tensors then run over distrib's transports (shared
memory on one host, the ZeroMQ ring across hosts), zero-copy through
``.numpy()`` views, and ``DistributedDataParallel`` trains over it. Needs torch
(``pip install distrib[torch]``).
"""

from __future__ import annotations

try:
    import torch.distributed as _tdist
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "distrib.torch needs PyTorch with torch.distributed: pip install 'distrib[torch]'"
    ) from exc

from ._backend import BACKEND_NAME, DistribProcessGroup, create

__all__ = ["BACKEND_NAME", "DistribProcessGroup", "register"]


def register() -> None:
    """Register the ``"distrib"`` backend with torch.distributed (done on import; idempotent)."""
    if BACKEND_NAME.upper() in _tdist.Backend._plugins:  # type: ignore[attr-defined]
        return
    _tdist.Backend.register_backend(BACKEND_NAME, create, extended_api=True, devices=["cpu"])


register()
