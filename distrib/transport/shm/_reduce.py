"""Shared-memory reductions: all-reduce, reduce, reduce-scatter.

They spread the work: rank ``r`` copies only the parts *other* ranks reduce
into its slot, reduces its own part ``r`` in rank order (``x0 op x1 op ...``,
so every rank gets bit-identical results) reading the others' slots in place,
publishes it, and copies the other parts' results out: no rank does more than
its 1/n share. All-reduce picks one of four paths by size (one-shot, the C
step, single-copy, staged); docs/performance.md has the measurements behind
the thresholds below.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..._errors import DistError, DistPeerLostError
from ..._reduce_op import ReduceOp, ufunc
from .._calldesc import digest
from ._native import NativeStep
from ._pipeline import ShmPipeline, _bounds

__all__ = ["ShmReductions"]


_MIN_REDUCE_PART = 64 << 10  # bytes: below this, per-step Python overhead dominates
# Reductions with size x bytes up to this take the one-shot path (one
# synchronisation; every rank reads all n buffers, hence the scaling with n).
# Measured at 2 ranks (docs/performance.md): one-shot beat the two-phase path
# up to 1-4 MiB on the loaded 2-core machine; 512 KiB total (256 KiB at 2 ranks,
# 32 KiB at 16) keeps the n-fold reads small where cores are plentiful.
_ONE_SHOT_MAX = 512 << 10
# All-reduces from this size copy the results straight out of the peers' own
# buffers (process_vm_readv) instead of through the segment; see
# docs/performance.md.
_CMA_MIN = 2 << 20
# Reductions up to this size run in one pipeline step (parts of size / n):
# measured at 2 ranks, one step beat two at 1 MiB once the per-step overhead
# had shrunk; larger messages take two or more steps so copies overlap.
_ONE_STEP_MAX = 1 << 20
# Polls (x86 `pause`) the C step spends on the peer's counter before handing
# the wait back to PhaseSync (timeouts, liveness, futex sleep): ~0.1-0.3 ms.
_NATIVE_SPIN = 4000
# The C step serves all-reduces between the one-shot sizes and this one; from
# here the single-copy path, which moves fewer bytes, was as fast or faster.
# Measured at 2 ranks: docs/performance.md.
_NATIVE_MAX = 16 << 20


def _fold(fn: Any, sources: Iterable[Any], out: Any) -> None:
    """``out = s0 op s1 op ...`` in the order given: rank order, so every rank and
    every path gets the same bits. ``sources`` may be lazy (``_in_rank_order``)."""
    it = iter(sources)
    first = next(it)
    fn(first, next(it), out=out)
    for src in it:
        fn(out, src, out=out)


class ShmReductions(ShmPipeline):
    """The reductions of ``ShmEngine`` (see ``ShmPipeline`` for the arguments)."""

    def _staged_steps(
        self, buf: Any, deadline: float, name: str
    ) -> Iterator[tuple[int, Any, list[int], int, int]]:
        """Begin each pipeline step of a reduction of ``buf``; yield ``(start, chunk,
        bounds, k, half)`` once this rank has copied into its slot half the parts
        of the chunk the other ranks reduce. The caller finishes step ``k``."""
        n, r = self.size, self.rank
        slots = self._seg.slots(buf.dtype)
        step = n * self._reduce_part(buf.nbytes, buf.dtype)
        for start in range(0, buf.size, step):
            chunk = buf[start : start + step]
            b = _bounds(chunk.size, n)
            k = self._begin(name, deadline)
            h = k & 1
            mine = slots[r][h]
            for q in range(n):
                if q != r and b[q] < b[q + 1]:
                    np.copyto(mine[b[q] : b[q + 1]], chunk[b[q] : b[q + 1]])
            yield start, chunk, b, k, h

    def _reduce_part(self, nbytes: int, dtype: np.dtype) -> int:
        """Elements per rank per step for a reduction of ``nbytes``.

        One step up to ``_ONE_STEP_MAX``, then at least two, so one step's
        copy-out overlaps the next step's copy-in; never above the slot's part
        size. Measured at 2 ranks (docs/performance.md, ``_shm_tunebench``):
        1 MiB ran fastest in one step, 4 MiB+ with the largest (1 MiB) parts.
        """
        steps = 1 if nbytes <= _ONE_STEP_MAX else 2
        want = -(-nbytes // (steps * self.size))
        part = min(self._part_bytes, max(_MIN_REDUCE_PART, want))
        return max(1, part // dtype.itemsize)

    # -- reductions ----------------------------------------------------------
    def _in_rank_order(
        self, parts: list[Any], k: int, h: int, name: str, deadline: float
    ) -> Iterator[Any]:
        """Yield ``parts[q]`` for q = 0, 1, ... once rank q has published step ``k``'s
        inputs (signalled ``2k+1``)."""
        for q, part in enumerate(parts):
            if q != self.rank:
                self._sync.wait(q, 2 * k + 1, name, deadline)
            yield part

    def _publish_call(self, h: int) -> None:
        """Publish the call's digest for the first step (when the group asked to agree)."""
        if self.call is not None:
            self._sync.publish_digest(h, digest(self.call))

    def _check_call(self, k: int, h: int, deadline: float) -> None:
        """Agree on the call inside step ``k``, before any user byte is written."""
        if self.call is not None:
            self._fused_check(self.call, k, h, deadline)

    def all_reduce(self, buf: Any, op: ReduceOp, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run(
                "all_reduce",
                deadline,
                self._reduce,
                buf,
                op,
                None,
                deadline,
                "all_reduce",
            )

    def reduce(self, buf: Any, op: ReduceOp, root: int, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run(
                "reduce",
                deadline,
                self._reduce,
                buf,
                op,
                root,
                deadline,
                "reduce",
            )

    def _reduce(self, buf: Any, op: ReduceOp, root: int | None, deadline: float, name: str) -> None:
        fn = ufunc(op)
        n, r, sync = self.size, self.rank, self._sync
        slots = self._seg.slots(buf.dtype)
        if buf.nbytes * n <= _ONE_SHOT_MAX and buf.nbytes <= self._half_bytes:
            self._reduce_one_shot(buf, fn, root, deadline, name, slots)
            return
        if (
            root is None
            and self._native is not None
            and NativeStep.supports(buf.dtype, op)
            and (self._reader is None or buf.nbytes < _NATIVE_MAX)
        ):
            self._all_reduce_native(buf, op, deadline, name)
            return
        if root is None and self._reader is not None and buf.nbytes >= _CMA_MIN:
            self._all_reduce_pull(buf, fn, deadline, name)
            return
        # 1. (in _staged_steps) publish the parts the other ranks reduce
        for start, chunk, b, k, h in self._staged_steps(buf, deadline, name):
            mine = slots[r][h]
            if start == 0:
                self._publish_call(h)
            sync.signal(2 * k + 1)
            if start == 0:
                self._check_call(k, h, deadline)
            # 2. reduce my part in rank order, reading the others' slots in place
            lo, hi = b[r], b[r + 1]
            acc = mine[lo:hi]
            parts = [chunk[lo:hi] if q == r else slots[q][h][lo:hi] for q in range(n)]
            _fold(fn, self._in_rank_order(parts, k, h, name, deadline), acc)
            sync.signal(2 * k + 2)
            # 3. collect every part's result
            if root is None or root == r:
                np.copyto(chunk[lo:hi], acc)
                for q in range(n):
                    if q != r:
                        sync.wait(q, 2 * k + 2, name, deadline)
                        np.copyto(chunk[b[q] : b[q + 1]], slots[q][h][b[q] : b[q + 1]])
            self._step = k + 1

    def _reduce_one_shot(
        self, buf: Any, fn: Any, root: int | None, deadline: float, name: str, slots: Any
    ) -> None:
        """Small messages: publish the whole buffer, every rank reduces all of it.

        One synchronisation instead of two; the n-fold reduction work is a few
        microseconds at these sizes, less than a second round of signals costs.
        Same rank order as the pipelined path, so results stay bit-identical.
        """
        n, r, sync = self.size, self.rank, self._sync
        k = self._begin(name, deadline)
        h = k & 1
        count = buf.size
        np.copyto(slots[r][h][:count], buf)
        self._publish_call(h)
        sync.signal(2 * k + 1)
        self._check_call(k, h, deadline)
        for q in range(n):
            if q != r:
                sync.wait(q, 2 * k + 1, name, deadline)
        if root is None or root == r:
            _fold(fn, [slots[q][h][:count] for q in range(n)], buf)
        sync.signal(2 * k + 2)
        self._step = k + 1

    def _all_reduce_native(self, buf: Any, op: ReduceOp, deadline: float, name: str) -> None:
        """float32/float64 sum or product: each pipeline step runs in C (``_shm_native.c``).

        Same steps, phases, parts and slot layout as the staged path, without
        the Python between phases and with the reduction writing its result to
        the slot and the buffer in one pass (three memory passes, not four).
        The C code only spins briefly; every longer wait comes back here to
        ``PhaseSync.wait`` (timeouts, dead peers, aborts, futex sleep).
        """
        native, sync = self._native, self._sync
        assert native is not None
        dtype = buf.dtype
        spin = _NATIVE_SPIN if sync.spins else 0
        step = self.size * self._reduce_part(buf.nbytes, dtype)
        for start in range(0, buf.size, step):
            chunk = buf[start : start + step]
            k = self._begin(name, deadline)
            h = k & 1
            verify = start == 0 and self.call is not None
            if verify:
                self._publish_call(h)
            stage = native(0, dtype, op, chunk, h, k, spin, verify)
            while stage != 0:
                if stage == 1:  # a peer has not published its inputs yet
                    sync.wait(native.blocked_on, 2 * k + 1, name, deadline)
                elif stage == 2:  # every peer's inputs are there: compare the calls first
                    self._check_call(k, h, deadline)
                elif stage == 3:  # a peer's part of the result is not final yet
                    sync.wait(native.blocked_on, 2 * k + 2, name, deadline)
                else:
                    raise DistError(
                        f"{name}: the native all-reduce step failed (stage {stage})",
                        rank=self._global[self.rank],
                        op=name,
                    )
                # resuming at 1 re-checks every peer, then stops again at 2 to verify
                stage = native(stage, dtype, op, chunk, h, k, spin, verify and stage == 1)
            self._step = k + 1

    def _all_reduce_pull(self, buf: Any, fn: Any, deadline: float, name: str) -> None:
        """Large all-reduce: stage inputs through the segment, pull results (single copy).

        Per chunk, rank r copies the parts the others reduce into its slot (as
        on the staged path), reduces its own part r *in place in its own
        buffer* reading the others' slots, and signals; the others then copy
        that final part straight out of its buffer with ``process_vm_readv``.
        That saves the staged path's copy of each result into and out of the
        segment. Same rank order (``x0 op x1 op ...``) and so the same bits as
        every other path.

        Buffers are only ever *read* across processes, never written: a rank
        that fails and returns early cannot have its memory scribbled on. A
        rank's buffer changes only in its own part (by itself) and in parts
        whose owner has signalled them final; a last barrier step keeps every
        buffer valid until all ranks have finished reading.
        """
        n, r, sync, reader = self.size, self.rank, self._sync, self._reader
        assert reader is not None
        slots = self._seg.slots(buf.dtype)
        itemsize = buf.itemsize
        base = buf.ctypes.data
        addrs: list[int] = []
        for start, chunk, b, k, h in self._staged_steps(buf, deadline, name):
            mine = slots[r][h]
            first = start == 0
            if first:
                sync.publish_addr(base)
                self._publish_call(h)
            sync.signal(2 * k + 1)
            if first:
                self._check_call(k, h, deadline)
            lo, hi = b[r], b[r + 1]
            own = chunk[lo:hi]
            spare = mine[lo:hi]  # my slot's own part: nobody else reads it
            parts = [own if q == r else slots[q][h][lo:hi] for q in range(n)]
            prev = acc = None
            for q, src in enumerate(self._in_rank_order(parts, k, h, name, deadline)):
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
                    self._pull(q, addrs[q] + (start + b[q]) * itemsize, dst, name)
            self._step = k + 1
        # nobody's buffer may change (return to its caller) while others still read it
        self._barrier(deadline, name)

    def _pull(self, q: int, addr: int, dst: np.ndarray, name: str) -> None:
        """Copy ``dst.nbytes`` at ``addr`` in local rank ``q``'s memory into ``dst``."""
        assert self._reader is not None
        try:
            self._reader.read(self._pids[q], addr, dst.ctypes.data, dst.nbytes)
        except DistError as exc:
            # If another rank already failed and aborted, q may just have returned
            # (and exited): report the original problem, not q.
            self._sync.check(name, q)
            me, peer = self._global[self.rank], self._global[q]
            raise DistPeerLostError(
                f"{name}: rank {me} could not read rank {peer}'s buffer (pid "
                f"{self._pids[q]}), which has probably exited: {exc}",
                rank=me,
                op=name,
                peer=peer,
            ) from exc

    def reduce_scatter(self, buf: Any, out: Any, op: ReduceOp, seq: int, deadline: float) -> None:
        if self.size == 1:
            np.copyto(out, buf)
            return
        self._run("reduce_scatter", deadline, self._reduce_scatter, buf, out, op, deadline)

    def _reduce_scatter(self, buf: Any, out: Any, op: ReduceOp, deadline: float) -> None:
        fn = ufunc(op)
        n, r, sync, name = self.size, self.rank, self._sync, "reduce_scatter"
        slots = self._seg.slots(buf.dtype)
        part = self._part(buf.dtype)
        m = out.size
        for start in range(0, m, part):
            c = min(part, m - start)
            k = self._begin(name, deadline)
            h = k & 1
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
            _fold(fn, self._in_rank_order(parts, k, h, name, deadline), out[start : start + c])
            sync.signal(2 * k + 2)
            self._step = k + 1
