"""``monitored_barrier``: a barrier that names the ranks that did not arrive (torch's).

Protocol over the group's store (not the collective engines, so it works on a
group whose transport is stuck): every rank but group rank 0 sets
``monitored_barrier/<n>/arrive/<rank>``; rank 0 waits for each key until the
deadline, then publishes ``monitored_barrier/<n>/result`` (``ok`` or the
missing global ranks); the others wait for that result. ``<n>`` counts this
group's monitored barriers, identical on every rank since all call it in order.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import msgpack

from .._errors import DistTimeoutError
from ..store import to_seconds
from ._call import resolve_group
from ._group import ProcessGroup

__all__ = ["monitored_barrier"]

# How much longer than rank 0 the other ranks wait for its verdict: rank 0 may
# spend the whole timeout waiting for a late rank before it can publish.
_VERDICT_GRACE_FRACTION = 0.5
_VERDICT_GRACE_MAX_S = 10.0

_generation: weakref.WeakKeyDictionary[ProcessGroup, int] = weakref.WeakKeyDictionary()


def monitored_barrier(
    group: ProcessGroup | None = None, timeout: Any = None, wait_all_ranks: bool = False
) -> None:
    """Wait for every rank of ``group``; on timeout raise ``DistTimeoutError`` naming who is late.

    Group rank 0 waits up to ``timeout`` (default: the group's) for each other
    rank and reports the first late rank, or with ``wait_all_ranks=True`` all
    of them; every rank then raises the same error.
    """
    pg = resolve_group(group, "monitored_barrier")
    if pg is None:
        return
    seconds = pg.timeout if timeout is None else to_seconds(timeout)
    n = _generation.get(pg, 0)
    _generation[pg] = n + 1
    base = f"monitored_barrier/{n}"
    me = pg.global_rank
    store = pg.store.clone()  # our own connection: the progress thread may be using pg.store
    try:
        if pg.rank() == 0:
            missing = _collect(store, pg, base, seconds, wait_all_ranks)
            store.set(f"{base}/result", msgpack.packb(missing))
        else:
            store.set(f"{base}/arrive/{pg.rank()}", b"1")
            wait_s = seconds + min(seconds * _VERDICT_GRACE_FRACTION, _VERDICT_GRACE_MAX_S)
            try:
                store.wait([f"{base}/result"], wait_s)
            except DistTimeoutError:
                raise DistTimeoutError(
                    f"monitored_barrier: rank {me} waited {wait_s:.1f} s for rank "
                    f"{pg.global_ranks[0]} (group rank 0), which did not arrive",
                    rank=me,
                    op="monitored_barrier",
                    peer=pg.global_ranks[0],
                ) from None
            missing = msgpack.unpackb(store.get(f"{base}/result"))
    finally:
        store.close()
    if missing:
        raise DistTimeoutError(
            f"monitored_barrier: rank(s) {missing} of group {pg.global_ranks} did not arrive "
            f"within {seconds:.1f} s (reported to rank {me})",
            rank=me,
            op="monitored_barrier",
            peer=missing[0],
        )


def _collect(
    store: Any, pg: ProcessGroup, base: str, seconds: float, wait_all_ranks: bool
) -> list[int]:
    """Global ranks that did not set their arrival key before the deadline."""
    deadline = time.monotonic() + seconds
    missing: list[int] = []
    for r in range(1, pg.size()):
        key = f"{base}/arrive/{r}"
        remaining = deadline - time.monotonic()
        try:
            if remaining > 0:
                store.wait([key], remaining)
            elif not store.check([key]):
                raise DistTimeoutError("late", op="monitored_barrier")
        except DistTimeoutError:
            missing.append(pg.global_ranks[r])
            if not wait_all_ranks:
                break
    return missing
