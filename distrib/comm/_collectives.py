"""Collectives on numpy (and cupy) arrays with torch's names, arguments and in-place rules.

Each function validates its arguments on the caller's thread (bad input raises
``ValueError``/``TypeError``/``DistUsageError`` at once, naming the rank and
argument), builds the call descriptor used for mismatch detection, and hands a
closure to the group, which runs it in issue order. Arrays are flattened to
C-contiguous 1-D buffers for the engine; a non-contiguous argument is copied
in and the result copied back.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any, cast

import msgpack
import numpy as np

from .._errors import DistMismatchError, DistUsageError
from ._api import resolve_group
from ._gpu import CudaEventWork, is_cupy_array
from ._group import ProcessGroup
from ._ops import ReduceOp, check_op_dtype
from ._zmq_links import describe

__all__ = [
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "gather",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
]


# -- validation helpers ---------------------------------------------------------


def xp_of(array: Any) -> Any:
    """numpy or cupy, whichever owns ``array``."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def check_array(pg: ProcessGroup, array: Any, arg: str, op: str, writable: bool = False) -> None:
    """Raise a clear error unless ``array`` is a numeric numpy/cupy array."""
    if not (isinstance(array, np.ndarray) or type(array).__module__.split(".")[0] == "cupy"):
        raise TypeError(
            f"{op}: {arg} must be a numpy or cupy array on rank {pg.global_rank}, got "
            f"{type(array).__name__}"
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


def _group_rank(pg: ProcessGroup, global_rank: Any, arg: str, op: str) -> int:
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


def _flat(array: Any) -> Any:
    """A C-contiguous 1-D buffer with ``array``'s data (a view when possible)."""
    if array.flags.c_contiguous:
        return array.reshape(-1)
    return xp_of(array).ascontiguousarray(array).reshape(-1)


def _write_back(array: Any, flat: Any) -> None:
    """Copy ``flat`` (from ``_flat(array)``) into ``array`` unless it is a view of it."""
    if not array.flags.c_contiguous:
        xp_of(array).copyto(array, flat.reshape(array.shape))


def _descriptor(op: str, **fields: Any) -> bytes:
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


def _run(
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
    if not check:
        desc = b""  # DISTRIB_CHECK_MISMATCH=0: every rank sends and expects an empty descriptor

    def body(deadline: float, seq: int) -> Any:
        engine.call_descriptor = desc
        if check and not engine.verifies_descriptors and pg.size() > 1:
            # The digests are numpy arrays: the CPU engine carries them for every engine.
            pg.cpu_engine.call_descriptor = desc
            _verify_descriptor(pg, pg.cpu_engine, desc, seq, op, deadline)
        return action(engine, seq, deadline)

    if async_op and is_cupy_array(sample):
        # GPU work is enqueued on the caller's current cupy stream (torch's NCCL semantics):
        # enqueue it here, in issue order, and hand back a Work backed by a CUDA event, so a
        # user's non-default stream orders the collective correctly.
        pg.submit(op, body, False)
        return CudaEventWork(None, op, pg.global_rank, pg.timeout)
    return pg.submit(op, body, async_op)


def _verify_descriptor(
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


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.shape)  # numpy and cupy shapes are tuples of Python ints


# -- reductions -------------------------------------------------------------------


def _finish_avg(flat: Any, op: ReduceOp, n: int) -> None:
    if op is ReduceOp.AVG:
        if flat.dtype.kind in "fc":
            flat /= n
        else:  # integers: floor division, so the result stays exact and in dtype
            xp_of(flat).floor_divide(flat, n, out=flat)


def all_reduce(
    tensor: Any, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False
) -> Any:
    """Reduce ``tensor`` across the group in place; every rank gets the result."""
    pg = resolve_group(group, "all_reduce")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "all_reduce", writable=True)
    rop = check_op_dtype(op, tensor.dtype, rank=pg.global_rank, opname="all_reduce")
    desc = _descriptor("all_reduce", shape=_shape(tensor), dtype=tensor.dtype.str, reduce=rop.name)

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        flat = _flat(tensor)
        engine.all_reduce(flat, rop, seq, deadline)
        _finish_avg(flat, rop, pg.size())
        _write_back(tensor, flat)
        return [tensor]

    return _run(pg, "all_reduce", tensor, desc, action, async_op)


def reduce(
    tensor: Any, dst: int, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False
) -> Any:
    """Reduce ``tensor`` into rank ``dst``'s ``tensor``; other ranks' arrays are unchanged."""
    pg = resolve_group(group, "reduce")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "reduce", writable=True)
    root = _group_rank(pg, dst, "dst", "reduce")
    rop = check_op_dtype(op, tensor.dtype, rank=pg.global_rank, opname="reduce")
    desc = _descriptor(
        "reduce", shape=_shape(tensor), dtype=tensor.dtype.str, reduce=rop.name, root=dst
    )

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        if pg.rank() == root:
            flat = _flat(tensor)
        else:  # the engine may use non-root buffers as scratch: keep the caller's intact
            flat = xp_of(tensor).array(tensor, copy=True).reshape(-1)
        engine.reduce(flat, rop, root, seq, deadline)
        if pg.rank() == root:
            _finish_avg(flat, rop, pg.size())
            _write_back(tensor, flat)
        return [tensor]

    return _run(pg, "reduce", tensor, desc, action, async_op)


def broadcast(tensor: Any, src: int, group: Any = None, async_op: bool = False) -> Any:
    """Copy rank ``src``'s ``tensor`` into every other rank's ``tensor``."""
    pg = resolve_group(group, "broadcast")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "broadcast", writable=True)
    root = _group_rank(pg, src, "src", "broadcast")
    desc = _descriptor("broadcast", shape=_shape(tensor), dtype=tensor.dtype.str, root=src)

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        flat = _flat(tensor)
        engine.broadcast(flat, root, seq, deadline)
        if pg.rank() != root:
            _write_back(tensor, flat)
        return [tensor]

    return _run(pg, "broadcast", tensor, desc, action, async_op)


# -- gathers and scatters ------------------------------------------------------


def _check_list(
    pg: ProcessGroup, arrays: Any, like: Any, arg: str, op: str, writable: bool
) -> None:
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


def _check_joined(pg: ProcessGroup, big: Any, small: Any, arg: str, op: str) -> None:
    if big.size != small.size * pg.size() or big.dtype != small.dtype:
        raise ValueError(
            f"{op}: {arg} must hold {pg.size()} x {small.size} elements of {small.dtype} on rank "
            f"{pg.global_rank}, got {big.size} of {big.dtype}"
        )


def all_gather(
    tensor_list: list[Any], tensor: Any, group: Any = None, async_op: bool = False
) -> Any:
    """Fill ``tensor_list[i]`` with rank i's ``tensor`` on every rank."""
    pg = resolve_group(group, "all_gather")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "all_gather")
    _check_list(pg, tensor_list, tensor, "tensor_list", "all_gather", True)
    desc = _descriptor("all_gather", shape=_shape(tensor), dtype=tensor.dtype.str)

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        xp, n, m = xp_of(tensor), pg.size(), tensor.size
        out = xp.empty(n * m, tensor.dtype)
        out[pg.rank() * m : (pg.rank() + 1) * m] = tensor.reshape(-1)
        engine.all_gather(out, seq, deadline)
        for i, t in enumerate(tensor_list):
            xp.copyto(t, out[i * m : (i + 1) * m].reshape(t.shape))
        return list(tensor_list)

    return _run(pg, "all_gather", tensor, desc, action, async_op)


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
    _check_joined(pg, output_tensor, input_tensor, "output_tensor", op)
    desc = _descriptor(op, shape=_shape(input_tensor), dtype=input_tensor.dtype.str)

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        m = input_tensor.size
        flat = _flat(output_tensor)
        flat[pg.rank() * m : (pg.rank() + 1) * m] = input_tensor.reshape(-1)
        engine.all_gather(flat, seq, deadline)
        _write_back(output_tensor, flat)
        return [output_tensor]

    return _run(pg, op, input_tensor, desc, action, async_op)


def gather(
    tensor: Any,
    gather_list: list[Any] | None = None,
    dst: int = 0,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """Rank ``dst`` gets every rank's ``tensor`` in ``gather_list`` (rank order)."""
    pg = resolve_group(group, "gather")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "gather")
    root = _group_rank(pg, dst, "dst", "gather")
    if pg.rank() == root:
        _check_list(pg, gather_list, tensor, "gather_list", "gather", True)
    elif gather_list is not None and len(gather_list) > 0:
        raise ValueError(
            f"gather: gather_list must be None on non-destination rank {pg.global_rank}"
        )
    desc = _descriptor("gather", shape=_shape(tensor), dtype=tensor.dtype.str, root=dst)

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        xp, n, m = xp_of(tensor), pg.size(), tensor.size
        out = xp.empty(n * m, tensor.dtype) if pg.rank() == root else None
        engine.gather(_flat(tensor), out, root, seq, deadline)
        if out is None:
            return []
        targets = cast(list, gather_list)
        for i, t in enumerate(targets):
            xp.copyto(t, out[i * m : (i + 1) * m].reshape(t.shape))
        return list(targets)

    return _run(pg, "gather", tensor, desc, action, async_op)


def scatter(
    tensor: Any,
    scatter_list: list[Any] | None = None,
    src: int = 0,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """Rank i's ``tensor`` gets ``scatter_list[i]`` of rank ``src``."""
    pg = resolve_group(group, "scatter")
    if pg is None:
        return None
    check_array(pg, tensor, "tensor", "scatter", writable=True)
    root = _group_rank(pg, src, "src", "scatter")
    if pg.rank() == root:
        _check_list(pg, scatter_list, tensor, "scatter_list", "scatter", False)
    elif scatter_list is not None and len(scatter_list) > 0:
        raise ValueError(f"scatter: scatter_list must be None on non-source rank {pg.global_rank}")
    desc = _descriptor("scatter", shape=_shape(tensor), dtype=tensor.dtype.str, root=src)

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        xp = xp_of(tensor)
        buf = None
        if pg.rank() == root:
            buf = xp.concatenate([xp.asarray(a).reshape(-1) for a in cast(list, scatter_list)])
        flat = _flat(tensor)
        engine.scatter(buf, flat, root, seq, deadline)
        _write_back(tensor, flat)
        return [tensor]

    return _run(pg, "scatter", tensor, desc, action, async_op)


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
    _check_list(pg, input_list, output, "input_list", "reduce_scatter", False)
    rop = check_op_dtype(op, output.dtype, rank=pg.global_rank, opname="reduce_scatter")
    desc = _descriptor(
        "reduce_scatter", shape=_shape(output), dtype=output.dtype.str, reduce=rop.name
    )

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        xp = xp_of(output)
        buf = xp.concatenate([xp.asarray(a).reshape(-1) for a in input_list])
        flat = _flat(output)
        engine.reduce_scatter(buf, flat, rop, seq, deadline)
        _finish_avg(flat, rop, pg.size())
        _write_back(output, flat)
        return [output]

    return _run(pg, "reduce_scatter", output, desc, action, async_op)


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
    _check_joined(pg, input, output, "input", name)
    rop = check_op_dtype(op, output.dtype, rank=pg.global_rank, opname=name)
    desc = _descriptor(name, shape=_shape(input), dtype=input.dtype.str, reduce=rop.name)

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        flat = _flat(output)
        engine.reduce_scatter(_flat(input), flat, rop, seq, deadline)
        _finish_avg(flat, rop, pg.size())
        _write_back(output, flat)
        return [output]

    return _run(pg, name, output, desc, action, async_op)


def all_to_all(
    output_tensor_list: list[Any],
    input_tensor_list: list[Any],
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """``output_tensor_list[j]`` on rank i gets ``input_tensor_list[i]`` of rank j.
    Every block has the same shape and dtype (uneven all-to-all is not supported)."""
    pg = resolve_group(group, "all_to_all")
    if pg is None:
        return None
    if not isinstance(input_tensor_list, (list, tuple)) or not input_tensor_list:
        raise ValueError(f"all_to_all: input_tensor_list must be a list of {pg.size()} arrays")
    like = input_tensor_list[0]
    check_array(pg, like, "input_tensor_list[0]", "all_to_all")
    _check_list(pg, input_tensor_list, like, "input_tensor_list", "all_to_all", False)
    _check_list(pg, output_tensor_list, like, "output_tensor_list", "all_to_all", True)
    desc = _descriptor("all_to_all", shape=_shape(like), dtype=like.dtype.str)

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        xp, n, m = xp_of(like), pg.size(), like.size
        buf = xp.concatenate([xp.asarray(a).reshape(-1) for a in input_tensor_list])
        out = xp.empty(n * m, like.dtype)
        engine.all_to_all(buf, out, seq, deadline)
        for i, t in enumerate(output_tensor_list):
            xp.copyto(t, out[i * m : (i + 1) * m].reshape(t.shape))
        return list(output_tensor_list)

    return _run(pg, "all_to_all", like, desc, action, async_op)


def all_to_all_single(
    output: Any,
    input: Any,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """Block j of ``input`` (split along dim 0) goes to rank j; block i of ``output``
    comes from rank i. Only even splits are supported."""
    pg = resolve_group(group, "all_to_all_single")
    if pg is None:
        return None
    name = "all_to_all_single"
    check_array(pg, input, "input", name)
    check_array(pg, output, "output", name, writable=True)
    n = pg.size()
    for arg, sizes in (
        ("input_split_sizes", input_split_sizes),
        ("output_split_sizes", output_split_sizes),
    ):
        if sizes is not None and len(set(sizes)) > 1:
            raise DistUsageError(
                f"{name}: uneven {arg}={list(sizes)} is not supported; pass equal splits",
                rank=pg.global_rank,
                op=name,
            )
    if (
        input.shape != output.shape
        or input.dtype != output.dtype
        or (input.ndim and input.shape[0] % n)
        or (not input.ndim)
    ):
        raise ValueError(
            f"{name}: input and output must have the same shape and dtype with dim 0 divisible "
            f"by the group size {n} on rank {pg.global_rank}; got {input.shape} {input.dtype} "
            f"and {output.shape} {output.dtype}"
        )
    desc = _descriptor(name, shape=_shape(input), dtype=input.dtype.str)

    def action(engine: Any, seq: int, deadline: float) -> list[Any]:
        flat = _flat(output)
        engine.all_to_all(_flat(input), flat, seq, deadline)
        _write_back(output, flat)
        return [output]

    return _run(pg, name, input, desc, action, async_op)


def barrier(group: Any = None, async_op: bool = False, device_ids: Any = None) -> Any:
    """Return once every rank of the group has called ``barrier``."""
    pg = resolve_group(group, "barrier")
    if pg is None:
        return None
    sample = np.empty(0, np.uint8)
    desc = _descriptor("barrier")
    return _run(pg, "barrier", sample, desc, lambda e, seq, dl: e.barrier(seq, dl), async_op)


# -- point to point ----------------------------------------------------------------


def _p2p(pg: ProcessGroup, op: str, tensor: Any, peer: int, tag: int, sending: bool) -> Any:
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise TypeError(f"{op}: tag must be an int, got {tag!r}")
    check_array(pg, tensor, "tensor", op, writable=not sending)
    arg = "dst" if sending else "src"
    peer_g = _group_rank(pg, peer, arg, op)
    if peer_g == pg.rank():
        raise DistUsageError(
            f"{op}: rank {pg.global_rank} cannot {'send to' if sending else 'receive from'} itself",
            rank=pg.global_rank,
            op=op,
            peer=peer,
        )
    engine = pg.engine_for(tensor)

    def body(deadline: float, seq: int) -> list[Any]:
        flat = _flat(tensor)
        if sending:
            engine.send(flat, peer_g, tag, deadline)
        else:
            engine.recv(flat, peer_g, tag, deadline)
            _write_back(tensor, flat)
        return [tensor]

    return body


def send(tensor: Any, dst: int, group: Any = None, tag: int = 0) -> None:
    """Send ``tensor`` to rank ``dst`` (matched by ``recv`` with the same ``tag``)."""
    pg = resolve_group(group, "send")
    if pg is not None:
        pg.submit("send", _p2p(pg, "send", tensor, dst, tag, True), False, False)


def recv(tensor: Any, src: int, group: Any = None, tag: int = 0) -> int:
    """Receive into ``tensor`` from rank ``src``; returns ``src``."""
    pg = resolve_group(group, "recv")
    if pg is not None:
        pg.submit("recv", _p2p(pg, "recv", tensor, src, tag, False), False, False)
    return src


def isend(tensor: Any, dst: int, group: Any = None, tag: int = 0) -> Any:
    """Asynchronous ``send``; returns a ``Work``."""
    pg = resolve_group(group, "isend")
    return (
        None
        if pg is None
        else pg.submit("isend", _p2p(pg, "isend", tensor, dst, tag, True), True, False)
    )


def irecv(tensor: Any, src: int, group: Any = None, tag: int = 0) -> Any:
    """Asynchronous ``recv``; returns a ``Work``."""
    pg = resolve_group(group, "irecv")
    return (
        None
        if pg is None
        else pg.submit("irecv", _p2p(pg, "irecv", tensor, src, tag, False), True, False)
    )
