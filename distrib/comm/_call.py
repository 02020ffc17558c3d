"""How one collective call is checked, described and issued.

The group a call targets (``resolve_group``), argument validation that names
the rank and the argument, the call descriptor behind mismatch detection, and
``issue``, which hands the call to its group. Shared by the collectives
(``_collectives``), point-to-point (``_p2p``) and the object collectives.

The road of a call is ``_collectives`` -> here -> ``_group`` -> back to the
collective's action -> the engine: keep it that short (``benchmarks/
trace_all_reduce.py`` checks it). Checks that repeat call after call are cached
(``functools.lru_cache`` answers a repeat without running Python code).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import DistUsageError
from .._reduce_op import ReduceOp, check_op_dtype
from .._xp import is_cupy, xp_of
from ..transport._calldesc import CallDesc
from ._group import NON_GROUP_MEMBER, ProcessGroup
from ._work import CudaEventWork

__all__ = [
    "check_array",
    "check_joined",
    "check_list",
    "descriptor",
    "finish_avg",
    "group_rank",
    "issue",
    "named_rank",
    "op_for",
    "resolve_group",
    "shape_of",
    "write_back",
]


def resolve_group(group: Any, op: str) -> ProcessGroup | None:
    """The group a call targets; ``None`` when this rank is not a member (a no-op)."""
    if group is None:
        pg = ProcessGroup.default
        if pg is None:  # never initialized (a forked child forgets its parent's)
            raise DistUsageError(
                f"{op}: the default process group is not initialized; call "
                "distrib.init_process_group() first",
                op=op,
            )
        return pg
    if group is NON_GROUP_MEMBER:
        return None
    if not isinstance(group, ProcessGroup):
        raise TypeError(f"{op}: group must be a ProcessGroup or None, got {type(group).__name__}")
    return group


@functools.lru_cache(maxsize=256)
def _checked_op(op: ReduceOp, dtype: Any, rank: int, opname: str) -> ReduceOp:
    return check_op_dtype(op, dtype, rank=rank, opname=opname)


def op_for(pg: ProcessGroup, op: Any, dtype: Any, opname: str) -> ReduceOp:
    """``op`` as a ``ReduceOp`` valid for ``dtype``, or a clear error naming the rank."""
    if type(op) is ReduceOp:  # the common case, cached (errors are raised, never cached)
        return _checked_op(op, dtype, pg.global_rank, opname)
    return check_op_dtype(op, dtype, rank=pg.global_rank, opname=opname)


def check_array(pg: ProcessGroup, array: Any, arg: str, op: str, writable: bool = False) -> None:
    """Raise a clear error unless ``array`` is a numeric numpy/cupy array."""
    if not (isinstance(array, np.ndarray) or is_cupy(array)):
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


def named_rank(
    pg: ProcessGroup,
    op: str,
    arg: str,
    global_rank: Any,
    rank_in_group: Any,
    default: int | None = None,
) -> int:
    """The global rank a call names, torch's way: ``arg`` (a global rank) or
    ``group_<arg>`` (a rank within ``pg``), never both; ``default`` (a global rank)
    when neither is given, else an error naming the two arguments."""
    if rank_in_group is not None:
        if global_rank is not None:
            raise DistUsageError(
                f"{op}: give {arg} (a global rank) or group_{arg} (a rank in the group), "
                f"not both (got {arg}={global_rank!r}, group_{arg}={rank_in_group!r})",
                rank=pg.global_rank,
                op=op,
            )
        if not isinstance(rank_in_group, (int, np.integer)) or isinstance(rank_in_group, bool):
            raise TypeError(f"{op}: group_{arg} must be an int rank, got {rank_in_group!r}")
        if not 0 <= int(rank_in_group) < pg.size():
            raise DistUsageError(
                f"{op}: group_{arg}={rank_in_group} is outside the group {pg.global_ranks} "
                f"(group ranks 0 to {pg.size() - 1}; called on rank {pg.global_rank})",
                rank=pg.global_rank,
                op=op,
            )
        return pg.global_ranks[int(rank_in_group)]
    if global_rank is None:
        if default is None:
            raise DistUsageError(
                f"{op}: give {arg} (a global rank) or group_{arg} (a rank in the group)",
                rank=pg.global_rank,
                op=op,
            )
        return default
    group_rank(pg, global_rank, arg, op)  # checks the type and the membership
    return int(global_rank)


def write_back(array: Any, flat: Any) -> None:
    """Copy ``flat`` (``array.ravel()``: a view when ``array`` is C-contiguous, else a
    copy) back into ``array`` unless it is a view of it."""
    if not array.flags.c_contiguous:
        xp_of(array).copyto(array, flat.reshape(array.shape))


def descriptor(
    op: str,
    *,
    shape: tuple[int, ...] = (),
    dtype: str = "",
    reduce: str = "",
    root: int = -1,
) -> CallDesc:
    """The call descriptor of one collective call (the group adds itself in ``issue``)."""
    return CallDesc(op, shape, dtype, reduce, int(root))


@functools.lru_cache(maxsize=1024)
def _in_group(call: CallDesc, group: tuple[int, ...]) -> CallDesc:
    # Cached: a training loop issues the same few calls over and over.
    return call._replace(group=group)


def issue(
    pg: ProcessGroup,
    op: str,
    sample: Any,
    call: CallDesc,
    action: Callable[[Any, CallDesc | None, int, float], Any],
    async_op: bool,
    timeout: float | None = None,
) -> Any:
    """Issue ``action(engine, call, seq, deadline)`` on ``pg`` once the ranks agree on
    ``call``; the action passes the ``call`` it gets on to the engine (``call=``): the
    descriptor when the engine checks it in its own first step, else ``None``.
    ``timeout`` (seconds) bounds this call instead of the group's timeout."""
    engine = pg.engine_for(sample)
    call = _in_group(call, pg.group_key)
    if async_op and is_cupy(sample):
        # GPU work is enqueued on the caller's current cupy stream (torch's NCCL semantics):
        # enqueue it here, in issue order, and hand back a Work backed by a CUDA event, so a
        # user's non-default stream orders the collective correctly.
        pg.issue_call(op, engine, call, action, False, timeout)
        return CudaEventWork(None, op, pg.global_rank, pg.timeout)
    return pg.issue_call(op, engine, call, action, async_op, timeout)


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
