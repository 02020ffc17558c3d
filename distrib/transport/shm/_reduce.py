"""Shared-memory reductions: all-reduce, reduce, reduce-scatter.

Each is a function of the group's ``SlotPipeline`` (``_pipeline``) and the
caller's buffers, run by ``ShmEngine`` through ``SlotPipeline.run``; the
pipeline owns the segment, the step counter and the optional C step and
cross-process reader these functions use.

They spread the work: rank ``r`` copies only the parts *other* ranks reduce
into its slot, reduces its own part ``r`` in rank order (``x0 op x1 op ...``,
so every rank gets bit-identical results) reading the others' slots in place,
publishes it, and copies the other parts' results out: no rank does more than
its 1/n share. ``reduce`` picks one of four paths by size (one-shot, the C
step, single-copy, staged); docs/performance.md has the measurements behind
the thresholds below, which are read at every call (module globals:
benchmarks/tune_shm_thresholds.py overrides them).

All-reduce and reduce check the call agreement inside their first step
(``ShmEngine.fused_agreement``): each publishes its call's digest with its
inputs, and compares the others' before writing any byte of the caller's buffer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..._errors import DistError
from ..._machine import machine
from ..._reduce_op import ReduceOp, ufunc
from .._calldesc import CallDesc, digest
from ._native import NativeStep
from ._pipeline import SlotPipeline
from ._stores import StoreKind

__all__ = ["reduce", "reduce_scatter"]


# Size thresholds follow the machine's caches (distrib._machine): each rule
# below reproduces the value measured best on a machine with a 1 MiB L2 and a
# 32 MiB last-level cache (docs/performance.md, benchmarks/tune_shm_thresholds.py)
# and scales with the caches elsewhere.
_L2 = machine().l2_bytes
# Bytes: below this a pipeline part costs more in per-step overhead than it moves.
_MIN_REDUCE_PART = _L2 // 16
# Reductions with size x ranks up to this take the one-shot path (one
# synchronisation; every rank reads all n buffers, hence the scaling with n):
# half the L2, so the n inputs a rank folds stay in its cache. Measured: one-shot
# beat the two-phase path up to 512 KiB total (256 KiB at 2 ranks).
_ONE_SHOT_MAX = _L2 // 2
# All-reduces from this size copy the results straight out of the peers' own
# buffers (process_vm_readv) instead of through the segment when there is no
# C step: twice the L2, where the segment's extra copy stops being cache-resident.
_CMA_MIN = 2 * _L2
# Reductions up to this size run in one pipeline step (parts of size / n):
# measured, one step beat two at 1 MiB once the per-step overhead had shrunk;
# larger messages take two or more steps so copies overlap.
_ONE_STEP_MAX = _L2
# Polls (x86 `pause`) the C step spends on the peer's counter before handing
# the wait back to PhaseSync (timeouts, liveness, futex sleep): ~0.1-0.3 ms.
_NATIVE_SPIN = 4000
# The C step serves all-reduces between the one-shot sizes and this one, half
# the last-level cache: it stages everything through the segment, which pays
# while the working set stays in cache; beyond, the single-copy path, which
# moves fewer bytes through memory, wins. Measured (docs/performance.md): on a
# 32 MiB cache the crossover was 16-32 MiB at 2 ranks and 16-64 MiB at 4.
_NATIVE_MAX = machine().llc_bytes // 2


def _bounds(count: int, parts: int) -> list[int]:
    """Offsets splitting ``count`` items into ``parts`` near-equal parts."""
    return [q * count // parts for q in range(parts + 1)]


def _fold(fn: Any, sources: Iterable[Any], out: Any) -> None:
    """``out = s0 op s1 op ...`` in the order given: rank order, so every rank and
    every path gets the same bits. ``sources`` may be lazy (``_in_rank_order``)."""
    it = iter(sources)
    first = next(it)
    fn(first, next(it), out=out)
    for src in it:
        fn(out, src, out=out)


def _in_rank_order(
    pipe: SlotPipeline, parts: list[Any], k: int, name: str, deadline: float
) -> Iterator[Any]:
    """Yield ``parts[q]`` for q = 0, 1, ... once rank q has published step ``k``'s
    inputs (signalled ``2k+1``)."""
    for q, part in enumerate(parts):
        if q != pipe.rank:
            pipe.sync.wait(q, 2 * k + 1, name, deadline)
        yield part


def _reduce_part(pipe: SlotPipeline, nbytes: int, dtype: np.dtype) -> int:
    """Elements per rank per step for a reduction of ``nbytes``.

    One step up to ``_ONE_STEP_MAX``, then at least two, so one step's
    copy-out overlaps the next step's copy-in; never above the slot's part
    size. Measured at 2 ranks (docs/performance.md,
    benchmarks/tune_shm_thresholds.py): 1 MiB ran fastest in one step, 4 MiB+
    with the largest (1 MiB) parts.
    """
    steps = 1 if nbytes <= _ONE_STEP_MAX else 2
    want = -(-nbytes // (steps * pipe.size))
    part = min(pipe.part_bytes, max(_MIN_REDUCE_PART, want))
    return max(1, part // dtype.itemsize)


def _staged_steps(
    pipe: SlotPipeline, buf: Any, deadline: float, name: str, stores: StoreKind
) -> Iterator[tuple[int, Any, list[int], int, int]]:
    """Begin each pipeline step of a reduction of ``buf``; yield ``(start, chunk,
    bounds, k, half)`` once this rank has copied into its slot half the parts
    of the chunk the other ranks reduce, with ``stores`` (``_stores``). The
    caller finishes step ``k``."""
    n, r = pipe.size, pipe.rank
    copy: Callable[[Any, Any], None] = np.copyto
    if stores is StoreKind.STREAMING and pipe.native is not None:
        copy = pipe.native.stream_copy
    slots = pipe.seg.slots(buf.dtype)
    step = n * _reduce_part(pipe, buf.nbytes, buf.dtype)
    for start in range(0, buf.size, step):
        chunk = buf[start : start + step]
        b = _bounds(chunk.size, n)
        k = pipe.begin(name, deadline)
        h = k & 1
        mine = slots[r][h]
        for q in range(n):
            if q != r and b[q] < b[q + 1]:
                copy(mine[b[q] : b[q + 1]], chunk[b[q] : b[q + 1]])
        yield start, chunk, b, k, h


# -- all-reduce and reduce -------------------------------------------------------
def one_shot_bytes(pipe: SlotPipeline) -> int:
    """Largest buffer reduced in one step (``_one_shot``); also the compiled small
    all-reduce's bound (``_small``), so both roads pick the same algorithm."""
    return min(_ONE_SHOT_MAX // pipe.size, pipe.half_bytes)


def reduce(
    pipe: SlotPipeline,
    buf: Any,
    op: ReduceOp,
    root: int | None,
    call: CallDesc | None,
    deadline: float,
    name: str,
) -> None:
    """Reduce ``buf`` into every rank's (``root`` None: all-reduce) or root's ``buf``,
    first checking that every rank passed an equal ``call`` (unless ``None``)."""
    fn = ufunc(op)
    slots = pipe.seg.slots(buf.dtype)
    if buf.nbytes <= one_shot_bytes(pipe):
        _one_shot(pipe, buf, fn, root, call, deadline, name, slots)
    elif (
        root is None
        and pipe.native is not None
        and NativeStep.supports(buf.dtype, op)
        and (pipe.reader is None or buf.nbytes <= _NATIVE_MAX)
    ):
        _native_all_reduce(pipe, buf, op, call, deadline, name)
    elif root is None and pipe.reader is not None and buf.nbytes >= _CMA_MIN:
        _pull_all_reduce(pipe, buf, fn, call, deadline, name)
    else:
        _staged(pipe, buf, fn, root, call, deadline, name, slots)


def _one_shot(
    pipe: SlotPipeline,
    buf: Any,
    fn: Any,
    root: int | None,
    call: CallDesc | None,
    deadline: float,
    name: str,
    slots: Any,
) -> None:
    """Small messages: publish the whole buffer, every rank reduces all of it.

    One synchronisation instead of two; the n-fold reduction work is a few
    microseconds at these sizes, less than a second round of signals costs.
    Same rank order as the pipelined path, so results stay bit-identical.
    This is the hot path of small all-reduces: keep it free of helper calls.
    """
    n, r, sync = pipe.size, pipe.rank, pipe.sync
    k = pipe.begin(name, deadline)
    h = k & 1
    count = buf.size
    np.copyto(slots[r][h][:count], buf)
    if call is not None:
        sync.publish_digest(h, digest(call))
    sync.signal(2 * k + 1)
    if call is not None:
        pipe.check_calls(call, k, h, deadline)
    for q in range(n):
        if q != r:
            sync.wait(q, 2 * k + 1, name, deadline)
    if root is None or root == r:
        _fold(fn, [slots[q][h][:count] for q in range(n)], buf)
    sync.signal(2 * k + 2)
    pipe.step = k + 1


def _staged(
    pipe: SlotPipeline,
    buf: Any,
    fn: Any,
    root: int | None,
    call: CallDesc | None,
    deadline: float,
    name: str,
    slots: Any,
) -> None:
    """Any size, dtype and op: every part goes through the segment twice (in, out)."""
    n, r, sync = pipe.size, pipe.rank, pipe.sync
    # 1. (in _staged_steps) publish the parts the other ranks reduce
    for start, chunk, b, k, h in _staged_steps(pipe, buf, deadline, name, StoreKind.CACHED):
        mine = slots[r][h]
        check = call if start == 0 else None  # agree on the call in the first step
        if check is not None:
            sync.publish_digest(h, digest(check))
        sync.signal(2 * k + 1)
        if check is not None:
            pipe.check_calls(check, k, h, deadline)
        # 2. reduce my part in rank order, reading the others' slots in place
        lo, hi = b[r], b[r + 1]
        acc = mine[lo:hi]
        parts = [chunk[lo:hi] if q == r else slots[q][h][lo:hi] for q in range(n)]
        _fold(fn, _in_rank_order(pipe, parts, k, name, deadline), acc)
        sync.signal(2 * k + 2)
        # 3. collect every part's result
        if root is None or root == r:
            np.copyto(chunk[lo:hi], acc)
            for q in range(n):
                if q != r:
                    sync.wait(q, 2 * k + 2, name, deadline)
                    np.copyto(chunk[b[q] : b[q + 1]], slots[q][h][b[q] : b[q + 1]])
        pipe.step = k + 1


def _native_all_reduce(
    pipe: SlotPipeline,
    buf: Any,
    op: ReduceOp,
    call: CallDesc | None,
    deadline: float,
    name: str,
) -> None:
    """float32/float64 sum or product: each pipeline step runs in C (``_native.c``).

    Same steps, phases, parts and slot layout as the staged path, without
    the Python between phases and with the reduction writing its result to
    the slot and the buffer in one pass (three memory passes, not four).
    The C code only spins briefly; every longer wait comes back here to
    ``PhaseSync.wait`` (timeouts, dead peers, aborts, futex sleep).
    """
    native, sync = pipe.native, pipe.sync
    assert native is not None
    stores = pipe.native_stores.pick()
    stream = stores is StoreKind.STREAMING
    began = time.perf_counter()
    dtype = buf.dtype
    spin = _NATIVE_SPIN if sync.spins else 0
    step = pipe.size * _reduce_part(pipe, buf.nbytes, dtype)
    for start in range(0, buf.size, step):
        chunk = buf[start : start + step]
        k = pipe.begin(name, deadline)
        h = k & 1
        check = call if start == 0 else None  # agree on the call in the first step
        verify = check is not None
        if check is not None:
            sync.publish_digest(h, digest(check))
        stage = native(0, dtype, op, chunk, h, k, spin, verify, stream)
        while stage != 0:
            if stage == 1:  # a peer has not published its inputs yet
                sync.wait(native.blocked_on, 2 * k + 1, name, deadline)
            elif stage == 2:  # every peer's inputs are there: compare the calls first
                if check is not None:
                    pipe.check_calls(check, k, h, deadline)
            elif stage == 3:  # a peer's part of the result is not final yet
                sync.wait(native.blocked_on, 2 * k + 2, name, deadline)
            else:
                raise DistError(
                    f"{name}: the native all-reduce step failed (stage {stage})",
                    rank=pipe.me,
                    op=name,
                )
            # resuming at 1 re-checks every peer, then stops again at 2 to verify
            stage = native(stage, dtype, op, chunk, h, k, spin, verify and stage == 1, stream)
        pipe.step = k + 1
    pipe.native_stores.record(stores, time.perf_counter() - began, buf.nbytes)


def _pull_all_reduce(
    pipe: SlotPipeline,
    buf: Any,
    fn: Any,
    call: CallDesc | None,
    deadline: float,
    name: str,
) -> None:
    """Large all-reduce: stage inputs through the segment, pull results (single copy).

    Per chunk, rank r copies the parts the others reduce into its slot (as
    on the staged path), reduces its own part r *in place in its own
    buffer* reading the others' slots, and signals; the others then copy
    that final part straight out of its buffer with ``process_vm_readv``
    (``SlotPipeline.pull``). That saves the staged path's copy of each result
    into and out of the segment. Same rank order (``x0 op x1 op ...``) and so
    the same bits as every other path.

    Buffers are only ever *read* across processes, never written: a rank
    that fails and returns early cannot have its memory scribbled on. A
    rank's buffer changes only in its own part (by itself) and in parts
    whose owner has signalled them final; a last barrier step keeps every
    buffer valid until all ranks have finished reading.
    """
    n, r, sync = pipe.size, pipe.rank, pipe.sync
    slots = pipe.seg.slots(buf.dtype)
    itemsize = buf.itemsize
    base = buf.ctypes.data
    addrs: list[int] = []
    stores = pipe.pull_stores.pick()
    began = time.perf_counter()
    for start, chunk, b, k, h in _staged_steps(pipe, buf, deadline, name, stores):
        mine = slots[r][h]
        first = start == 0
        check = call if first else None  # agree on the call in the first step
        if first:
            sync.publish_addr(base)
        if check is not None:
            sync.publish_digest(h, digest(check))
        sync.signal(2 * k + 1)
        if check is not None:
            pipe.check_calls(check, k, h, deadline)
        lo, hi = b[r], b[r + 1]
        own = chunk[lo:hi]
        spare = mine[lo:hi]  # my slot's own part: nobody else reads it
        parts = [own if q == r else slots[q][h][lo:hi] for q in range(n)]
        prev = acc = None
        for q, src in enumerate(_in_rank_order(pipe, parts, k, name, deadline)):
            if prev is None:
                prev = src
                continue
            # rank order, x0 op x1 op ...: fold into the spare part until my
            # own input has been used, then into my buffer in place
            out = own if q >= r else spare
            fn(prev if acc is None else acc, src, out=out)
            acc = out
        if first:
            addrs = [sync.addr(q) for q in range(n)]
        sync.signal(2 * k + 2)  # my part of this chunk is final, in my buffer
        for q in range(n):
            if q != r and b[q] < b[q + 1]:
                sync.wait(q, 2 * k + 2, name, deadline)
                dst = chunk[b[q] : b[q + 1]]
                pipe.pull(q, addrs[q] + (start + b[q]) * itemsize, dst, name)
        pipe.step = k + 1
    # nobody's buffer may change (return to its caller) while others still read it
    pipe.barrier(deadline, name)
    pipe.pull_stores.record(stores, time.perf_counter() - began, buf.nbytes)


# -- reduce-scatter --------------------------------------------------------------
def reduce_scatter(pipe: SlotPipeline, buf: Any, out: Any, op: ReduceOp, deadline: float) -> None:
    """Rank r's ``out`` (m) gets block r of every rank's ``buf`` (n*m), reduced in
    rank order; each step moves one part of every block."""
    fn = ufunc(op)
    n, r, sync, name = pipe.size, pipe.rank, pipe.sync, "reduce_scatter"
    slots = pipe.seg.slots(buf.dtype)
    part = pipe.part(buf.dtype)
    m = out.size
    for start, c, k, h in pipe.chunks(name, m, part, deadline):
        mine = slots[r][h]
        for q in range(n):
            if q != r:
                np.copyto(mine[q * part : q * part + c], buf[q * m + start : q * m + start + c])
        sync.signal(2 * k + 1)
        parts = [
            buf[r * m + start : r * m + start + c]
            if q == r
            else slots[q][h][r * part : r * part + c]
            for q in range(n)
        ]
        _fold(fn, _in_rank_order(pipe, parts, k, name, deadline), out[start : start + c])
