"""Collectives on numpy (and cupy) arrays with torch's names, arguments and in-place rules.

Each function validates its arguments on the caller's thread (bad input raises
``ValueError``/``TypeError``/``DistUsageError`` at once, naming the rank and
argument), builds the call descriptor used for mismatch detection, and hands a
closure to the group, which runs it in issue order. Arrays are flattened to
C-contiguous 1-D buffers for the engine; a non-contiguous argument is copied
in and the result copied back (``_call``). Point-to-point is in ``_p2p``.
"""

from __future__ import annotations

import itertools
from typing import Any, cast

import numpy as np

from .._reduce_op import ReduceOp
from .._xp import xp_of
from ..store import to_seconds
from ..transport._calldesc import CallDesc
from ._call import (
    check_array,
    check_joined,
    check_list,
    descriptor,
    finish_avg,
    group_rank,
    issue,
    named_rank,
    op_for,
    resolve_group,
    shape_of,
    write_back,
)
from ._uneven import exchange_blocks

__all__ = [
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
]


# -- reductions -------------------------------------------------------------------


def all_reduce(
    tensor: Any, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False
) -> Any:
    """Reduce ``tensor`` across the group in place; every rank gets the result."""
    pg = resolve_group(group, "all_reduce")
    if pg is None:
        return None
    if not async_op and type(tensor) is np.ndarray and pg.all_reduce_small(tensor, op):
        return None  # done in one compiled step (small, contiguous, nothing in flight)
    check_array(pg, tensor, "tensor", "all_reduce", writable=True)
    rop = op_for(pg, op, tensor.dtype, "all_reduce")
    desc = descriptor("all_reduce", shape=shape_of(tensor), dtype=tensor.dtype.str, reduce=rop.name)

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        flat = tensor.ravel()
        engine.all_reduce(flat, rop, seq, deadline, call=call)
        finish_avg(flat, rop, pg.size())
        write_back(tensor, flat)
        return [tensor]

    return issue(pg, "all_reduce", tensor, desc, action, async_op)


def reduce(
    tensor: Any,
    dst: int | None = None,
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    group_dst: int | None = None,
) -> Any:
    """Reduce ``tensor`` into rank ``dst``'s ``tensor`` (``group_dst``: the destination's
    rank within ``group``); other ranks' arrays are unchanged."""
    pg = resolve_group(group, "reduce")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "reduce", writable=True)
    dst = named_rank(pg, "reduce", "dst", dst, group_dst)
    root = group_rank(pg, dst, "dst", "reduce")
    rop = op_for(pg, op, tensor.dtype, "reduce")
    desc = descriptor(
        "reduce", shape=shape_of(tensor), dtype=tensor.dtype.str, reduce=rop.name, root=dst
    )

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        if pg.rank() == root:
            flat = tensor.ravel()
        else:  # the engine may use non-root buffers as scratch: keep the caller's intact
            flat = xp_of(tensor).array(tensor, copy=True).reshape(-1)
        engine.reduce(flat, rop, root, seq, deadline, call=call)
        if pg.rank() == root:
            finish_avg(flat, rop, pg.size())
            write_back(tensor, flat)
        return [tensor]

    return issue(pg, "reduce", tensor, desc, action, async_op)


def broadcast(
    tensor: Any,
    src: int | None = None,
    group: Any = None,
    async_op: bool = False,
    group_src: int | None = None,
) -> Any:
    """Copy rank ``src``'s ``tensor`` into every other rank's ``tensor`` (``group_src``:
    the source's rank within ``group``)."""
    pg = resolve_group(group, "broadcast")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "broadcast", writable=True)
    src = named_rank(pg, "broadcast", "src", src, group_src)
    root = group_rank(pg, src, "src", "broadcast")
    desc = descriptor("broadcast", shape=shape_of(tensor), dtype=tensor.dtype.str, root=src)

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        flat = tensor.ravel()
        engine.broadcast(flat, root, seq, deadline, call=call)
        if pg.rank() != root:
            write_back(tensor, flat)
        return [tensor]

    return issue(pg, "broadcast", tensor, desc, action, async_op)


# -- gathers and scatters ------------------------------------------------------


def all_gather(
    tensor_list: list[Any], tensor: Any, group: Any = None, async_op: bool = False
) -> Any:
    """Fill ``tensor_list[i]`` with rank i's ``tensor`` on every rank."""
    pg = resolve_group(group, "all_gather")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "all_gather")
    check_list(pg, tensor_list, tensor, "tensor_list", "all_gather", True)
    desc = descriptor("all_gather", shape=shape_of(tensor), dtype=tensor.dtype.str)

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        xp, n, m = xp_of(tensor), pg.size(), tensor.size
        out = xp.empty(n * m, tensor.dtype)
        out[pg.rank() * m : (pg.rank() + 1) * m] = tensor.reshape(-1)
        engine.all_gather(out, seq, deadline, call=call)
        for i, t in enumerate(tensor_list):
            xp.copyto(t, out[i * m : (i + 1) * m].reshape(t.shape))
        return list(tensor_list)

    return issue(pg, "all_gather", tensor, desc, action, async_op)


def all_gather_into_tensor(
    output_tensor: Any, input_tensor: Any, group: Any = None, async_op: bool = False
) -> Any:
    """Concatenate every rank's ``input_tensor`` (rank order) into ``output_tensor``."""
    pg = resolve_group(group, "all_gather_into_tensor")
    if pg is None:
        return None
    op = "all_gather_into_tensor"
    check_array(pg, input_tensor, "input_tensor", op)
    check_array(pg, output_tensor, "output_tensor", op, writable=True)
    check_joined(pg, output_tensor, input_tensor, "output_tensor", op)
    desc = descriptor(op, shape=shape_of(input_tensor), dtype=input_tensor.dtype.str)

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        m = input_tensor.size
        flat = output_tensor.ravel()
        flat[pg.rank() * m : (pg.rank() + 1) * m] = input_tensor.reshape(-1)
        engine.all_gather(flat, seq, deadline, call=call)
        write_back(output_tensor, flat)
        return [output_tensor]

    return issue(pg, op, input_tensor, desc, action, async_op)


def gather(
    tensor: Any,
    gather_list: list[Any] | None = None,
    dst: int | None = None,
    group: Any = None,
    async_op: bool = False,
    group_dst: int | None = None,
) -> Any:
    """Rank ``dst`` (``group_dst`` within ``group``; default global rank 0) gets every
    rank's ``tensor`` in ``gather_list`` (rank order)."""
    pg = resolve_group(group, "gather")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "gather")
    dst = named_rank(pg, "gather", "dst", dst, group_dst, default=0)
    root = group_rank(pg, dst, "dst", "gather")
    if pg.rank() == root:
        check_list(pg, gather_list, tensor, "gather_list", "gather", True)
    elif gather_list is not None and len(gather_list) > 0:
        raise ValueError(
            f"gather: gather_list must be None on non-destination rank {pg.global_rank}"
        )
    desc = descriptor("gather", shape=shape_of(tensor), dtype=tensor.dtype.str, root=dst)

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        xp, n, m = xp_of(tensor), pg.size(), tensor.size
        out = xp.empty(n * m, tensor.dtype) if pg.rank() == root else None
        engine.gather(tensor.ravel(), out, root, seq, deadline, call=call)
        if out is None:
            return []
        targets = cast(list, gather_list)
        for i, t in enumerate(targets):
            xp.copyto(t, out[i * m : (i + 1) * m].reshape(t.shape))
        return list(targets)

    return issue(pg, "gather", tensor, desc, action, async_op)


def scatter(
    tensor: Any,
    scatter_list: list[Any] | None = None,
    src: int | None = None,
    group: Any = None,
    async_op: bool = False,
    group_src: int | None = None,
) -> Any:
    """Rank i's ``tensor`` gets ``scatter_list[i]`` of rank ``src`` (``group_src`` within
    ``group``; default global rank 0)."""
    pg = resolve_group(group, "scatter")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "scatter", writable=True)
    src = named_rank(pg, "scatter", "src", src, group_src, default=0)
    root = group_rank(pg, src, "src", "scatter")
    if pg.rank() == root:
        check_list(pg, scatter_list, tensor, "scatter_list", "scatter", False)
    elif scatter_list is not None and len(scatter_list) > 0:
        raise ValueError(f"scatter: scatter_list must be None on non-source rank {pg.global_rank}")
    desc = descriptor("scatter", shape=shape_of(tensor), dtype=tensor.dtype.str, root=src)

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        xp = xp_of(tensor)
        buf = None
        if pg.rank() == root:
            buf = xp.concatenate([xp.asarray(a).reshape(-1) for a in cast(list, scatter_list)])
        flat = tensor.ravel()
        engine.scatter(buf, flat, root, seq, deadline, call=call)
        write_back(tensor, flat)
        return [tensor]

    return issue(pg, "scatter", tensor, desc, action, async_op)


def reduce_scatter(
    output: Any,
    input_list: list[Any],
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """``output`` on rank i gets the reduction over ranks of their ``input_list[i]``."""
    pg = resolve_group(group, "reduce_scatter")
    if pg is None:
        return None
    check_array(pg, output, "output", "reduce_scatter", writable=True)
    check_list(pg, input_list, output, "input_list", "reduce_scatter", False)
    rop = op_for(pg, op, output.dtype, "reduce_scatter")
    desc = descriptor(
        "reduce_scatter", shape=shape_of(output), dtype=output.dtype.str, reduce=rop.name
    )

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        xp = xp_of(output)
        buf = xp.concatenate([xp.asarray(a).reshape(-1) for a in input_list])
        flat = output.ravel()
        engine.reduce_scatter(buf, flat, rop, seq, deadline, call=call)
        finish_avg(flat, rop, pg.size())
        write_back(output, flat)
        return [output]

    return issue(pg, "reduce_scatter", output, desc, action, async_op)


def reduce_scatter_tensor(
    output: Any, input: Any, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False
) -> Any:
    """``output`` on rank i gets the reduction of block i of every rank's ``input``."""
    pg = resolve_group(group, "reduce_scatter_tensor")
    if pg is None:
        return None
    name = "reduce_scatter_tensor"
    check_array(pg, output, "output", name, writable=True)
    check_array(pg, input, "input", name)
    check_joined(pg, input, output, "input", name)
    rop = op_for(pg, op, output.dtype, name)
    desc = descriptor(name, shape=shape_of(input), dtype=input.dtype.str, reduce=rop.name)

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        flat = output.ravel()
        engine.reduce_scatter(input.ravel(), flat, rop, seq, deadline, call=call)
        finish_avg(flat, rop, pg.size())
        write_back(output, flat)
        return [output]

    return issue(pg, name, output, desc, action, async_op)


def all_to_all(
    output_tensor_list: list[Any],
    input_tensor_list: list[Any],
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """``output_tensor_list[j]`` on rank i gets ``input_tensor_list[i]`` of rank j. Blocks
    may differ in size and shape; each output block needs as many elements as its
    sender's input block (checked on every rank before data moves)."""
    pg = resolve_group(group, "all_to_all")
    if pg is None:
        return None
    return exchange_blocks(pg, "all_to_all", output_tensor_list, input_tensor_list, async_op)


def all_to_all_single(
    output: Any,
    input: Any,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """Block j of ``input`` (split along dim 0) goes to rank j; block i of ``output``
    comes from rank i. Without split sizes (None or empty) dim 0 splits evenly; with
    them, blocks of any size (give them on every rank or on none)."""
    pg = resolve_group(group, "all_to_all_single")
    if pg is None:
        return None
    name = "all_to_all_single"
    check_array(pg, input, "input", name)
    check_array(pg, output, "output", name, writable=True)
    if input.ndim == 0 or output.ndim == 0:
        raise ValueError(
            f"{name}: input and output need at least one dimension (split along dim 0) on "
            f"rank {pg.global_rank}; got shapes {input.shape} and {output.shape}"
        )
    out_sizes = [] if output_split_sizes is None else list(output_split_sizes)
    in_sizes = [] if input_split_sizes is None else list(input_split_sizes)
    if out_sizes or in_sizes:
        outs = _split_rows(pg, name, output, out_sizes, "output")
        ins = _split_rows(pg, name, input, in_sizes, "input")
        return exchange_blocks(pg, name, outs, ins, async_op, [output])
    n = pg.size()
    if input.shape != output.shape or input.dtype != output.dtype or input.shape[0] % n:
        raise ValueError(
            f"{name}: without split sizes, input and output must have the same shape and "
            f"dtype with dim 0 divisible by the group size {n} on rank {pg.global_rank}; "
            f"got {input.shape} {input.dtype} and {output.shape} {output.dtype}"
        )
    desc = descriptor(name, shape=shape_of(input), dtype=input.dtype.str)

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> list[Any]:
        flat = output.ravel()
        engine.all_to_all(input.ravel(), flat, seq, deadline, call=call)
        write_back(output, flat)
        return [output]

    return issue(pg, name, input, desc, action, async_op)


def _split_rows(pg: Any, name: str, array: Any, sizes: list[Any], arg: str) -> list[Any]:
    """``array`` split along dim 0 into views of ``sizes`` rows (empty: evenly)."""
    n, rows = pg.size(), array.shape[0]
    if not sizes:
        if rows % n:
            raise ValueError(
                f"{name}: {arg} has {rows} rows on rank {pg.global_rank}, not divisible by the "
                f"group size {n}; give {arg}_split_sizes"
            )
        sizes = [rows // n] * n
    if len(sizes) != n or any(
        not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0 for k in sizes
    ):
        raise ValueError(
            f"{name}: {arg}_split_sizes must be {n} non-negative ints (one per rank) on rank "
            f"{pg.global_rank}, got {sizes!r}"
        )
    if sum(sizes) != rows:
        raise ValueError(
            f"{name}: {arg}_split_sizes {sizes} add up to {sum(sizes)} rows, but {arg} has "
            f"{rows} on rank {pg.global_rank}"
        )
    edges = np.cumsum([0, *sizes]).tolist()
    return [array[a:b] for a, b in itertools.pairwise(edges)]


def barrier(
    group: Any = None, async_op: bool = False, device_ids: Any = None, timeout: Any = None
) -> Any:
    """Return once every rank of the group has called ``barrier``. ``timeout`` (seconds or
    a ``timedelta``) bounds this barrier instead of the group's timeout; running out of
    it fails the group like any timeout (``monitored_barrier`` names who is late)."""
    pg = resolve_group(group, "barrier")
    if pg is None:
        return None
    seconds = None if timeout is None else to_seconds(timeout, "barrier: timeout")
    sample = np.empty(0, np.uint8)
    desc = descriptor("barrier")

    def action(engine: Any, call: CallDesc | None, seq: int, deadline: float) -> None:
        engine.barrier(seq, deadline, call=call)

    return issue(pg, "barrier", sample, desc, action, async_op, seconds)
