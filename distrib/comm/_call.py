"""How one collective call is checked, described and issued.

Argument validation that names the rank and the argument, flattening to the
engines' contiguous 1-D buffers, the call descriptor behind mismatch
detection, and ``issue``, which hands the call to its group in issue order.
Shared by the collectives (``_collectives``) and point-to-point (``_p2p``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from .._errors import DistMismatchError, DistUsageError
from ._gpu import CudaEventWork, is_cupy_array
from ._group import ProcessGroup
from ._ops import ReduceOp
from ._zmq_links import describe

__all__ = [
    "check_array",
    "check_joined",
    "check_list",
    "descriptor",
    "finish_avg",
    "flat_view",
    "group_rank",
    "issue",
    "shape_of",
    "write_back",
    "xp_of",
]


def xp_of(array: Any) -> Any:
    """numpy or cupy, whichever owns ``array``."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def check_array(pg: ProcessGroup, array: Any, arg: str, op: str, writable: bool = False) -> None:
    """Raise a clear error unless ``array`` is a numeric numpy/cupy array."""
    if not (isinstance(array, np.ndarray) or type(array).__module__.split(".")[0] == "cupy"):
        hint = ""
        if type(array).__module__.split(".")[0] == "torch":
            # torch users' first try: say how to pass the tensor without a copy
            hint = (
                f"; pass {arg}.numpy() for a CPU tensor (a view: the result lands in the "
                f"tensor) or cupy.asarray({arg}) for a CUDA tensor"
            )
        raise TypeError(
            f"{op}: {arg} must be a numpy or cupy array on rank {pg.global_rank}, got "
            f"{type(array).__module__}.{type(array).__name__}{hint}"
        )
    kind = array.dtype.kind
    if kind not in "biufc":
        raise TypeError(
            f"{op}: {arg} has dtype {array.dtype} on rank {pg.global_rank}; collectives need "
            "a numeric (bool, integer, float or complex) dtype"
        )
    if writable and isinstance(array, np.ndarray) and not array.flags.writeable:
        raise ValueError(
            f"{op}: {arg} is read-only on rank {pg.global_rank}; it is written in place"
        )


def group_rank(pg: ProcessGroup, global_rank: Any, arg: str, op: str) -> int:
    if not isinstance(global_rank, (int, np.integer)) or isinstance(global_rank, bool):
        raise TypeError(f"{op}: {arg} must be an int rank, got {global_rank!r}")
    try:
        return pg.global_ranks.index(int(global_rank))
    except ValueError:
        raise DistUsageError(
            f"{op}: {arg}={global_rank} is not a member of the group {pg.global_ranks} "
            f"(called on rank {pg.global_rank})",
            rank=pg.global_rank,
            op=op,
        ) from None


def flat_view(array: Any) -> Any:
    """A C-contiguous 1-D buffer with ``array``'s data (a view when possible)."""
    if array.flags.c_contiguous:
        return array.reshape(-1)
    return xp_of(array).ascontiguousarray(array).reshape(-1)


def write_back(array: Any, flat: Any) -> None:
    """Copy ``flat`` (from ``flat_view(array)``) into ``array`` unless it is a view of it."""
    if not array.flags.c_contiguous:
        xp_of(array).copyto(array, flat.reshape(array.shape))


def descriptor(op: str, **fields: Any) -> bytes:
    """The call descriptor (msgpack map) of one collective call.

    Cached: a training loop issues the same few calls over and over, packing
    costs microseconds, and returning the *same* bytes object lets engines
    cache their digest of it too.
    """
    try:
        return _packed(op, tuple(fields.items()))
    except TypeError:  # an unhashable field value
        return msgpack.packb({"op": op, **fields})


@functools.lru_cache(maxsize=512)
def _packed(op: str, fields: tuple[tuple[str, Any], ...]) -> bytes:
    return msgpack.packb({"op": op, **dict(fields)})


def issue(
    pg: ProcessGroup,
    op: str,
    sample: Any,
    desc: bytes,
    action: Callable[[Any, int, float], Any],
    async_op: bool,
) -> Any:
    """Issue ``action(engine, seq, deadline)`` on ``pg`` after the descriptor check."""
    engine = pg.engine_for(sample)
    check = pg.check_mismatch
    body_desc = desc  # for the flight recorder, before a disabled check blanks it
    if not check:
        desc = b""  # DISTRIB_CHECK_MISMATCH=0: every rank sends and expects an empty descriptor

    def body(deadline: float, seq: int) -> Any:
        engine.call_descriptor = desc
        if check and not engine.verifies_descriptors and pg.size() > 1:
            # The digests are numpy arrays: the CPU engine carries them for every engine.
            pg.cpu_engine.call_descriptor = desc
            verify_descriptor(pg, pg.cpu_engine, desc, seq, op, deadline)
        return action(engine, seq, deadline)

    body.flight_desc = body_desc  # type: ignore[attr-defined]
    if async_op and is_cupy_array(sample):
        # GPU work is enqueued on the caller's current cupy stream (torch's NCCL semantics):
        # enqueue it here, in issue order, and hand back a Work backed by a CUDA event, so a
        # user's non-default stream orders the collective correctly.
        pg.submit(op, body, False)
        return CudaEventWork(None, op, pg.global_rank, pg.timeout)
    return pg.submit(op, body, async_op)


def verify_descriptor(
    pg: ProcessGroup, engine: Any, desc: bytes, seq: int, op: str, deadline: float
) -> None:
    """Mismatch check for engines that do not compare descriptors in their own traffic:
    all-gather an 8-byte digest; on a difference, name both sides through the store."""
    n, r = pg.size(), pg.rank()
    digests = np.zeros(n, np.int64)
    digests[r] = int.from_bytes(
        hashlib.blake2b(desc, digest_size=8).digest(), "little", signed=True
    )
    engine.all_gather(digests, seq, deadline)
    if (digests == digests[r]).all():
        return
    pg.store.set(f"desc/{seq}/{r}", desc)
    other = int(np.flatnonzero(digests != digests[r])[0])
    theirs = pg.store.get(f"desc/{seq}/{other}")
    err = DistMismatchError(
        f"{op}: mismatched collectives at op #{seq}: rank {pg.global_rank} called "
        f"{describe(desc)} but rank {pg.global_ranks[other]} called {describe(theirs)}",
        rank=pg.global_rank,
        op=op,
        peer=pg.global_ranks[other],
    )
    # Every rank saw the same digests and raises by itself: aborting the engine would
    # only race the others out of their last step.
    err.seen_by_every_rank = True  # type: ignore[attr-defined]
    raise err


def shape_of(a: Any) -> tuple[int, ...]:
    return tuple(a.shape)  # numpy and cupy shapes are tuples of Python ints


def check_list(pg: ProcessGroup, arrays: Any, like: Any, arg: str, op: str, writable: bool) -> None:
    n = pg.size()
    if not isinstance(arrays, (list, tuple)) or len(arrays) != n:
        got = len(arrays) if isinstance(arrays, (list, tuple)) else type(arrays).__name__
        raise ValueError(
            f"{op}: {arg} must be a list of {n} arrays (the group size) on rank "
            f"{pg.global_rank}, got {got}"
        )
    for i, a in enumerate(arrays):
        check_array(pg, a, f"{arg}[{i}]", op, writable)
        if a.shape != like.shape or a.dtype != like.dtype:
            raise ValueError(
                f"{op}: {arg}[{i}] has shape {a.shape} dtype {a.dtype} on rank {pg.global_rank}; "
                f"expected shape {like.shape} dtype {like.dtype} like the input"
            )


def check_joined(pg: ProcessGroup, big: Any, small: Any, arg: str, op: str) -> None:
    if big.size != small.size * pg.size() or big.dtype != small.dtype:
        raise ValueError(
            f"{op}: {arg} must hold {pg.size()} x {small.size} elements of {small.dtype} on rank "
            f"{pg.global_rank}, got {big.size} of {big.dtype}"
        )


def finish_avg(flat: Any, op: ReduceOp, n: int) -> None:
    if op is ReduceOp.AVG:
        if flat.dtype.kind in "fc":
            flat /= n
        else:  # integers: floor division, so the result stays exact and in dtype
            xp_of(flat).floor_divide(flat, n, out=flat)
