"""Shared-memory collectives among the ranks of one machine.

Every collective is a pipeline of *steps*. In step ``k`` each rank uses half
``k % 2`` of its own slot in the node's segment (``_shm_segment``): it writes
what the others need, signals phase ``2k+1``, reads what it needs straight out
of the others' slots, and signals phase ``2k+2`` (``_shm_sync``). A step moves
at most ``size * part_bytes`` bytes, so each rank's share stays cache-sized,
and two halves let step ``k+1`` fill while step ``k`` drains. Before writing a
half again (step ``k+2``) a rank waits until everyone signalled ``2k+3``, i.e.
finished step ``k`` entirely (the next op may split the half differently). Every rank signals ``2k+2`` in every step of every
collective, so the counters stay in lock-step across operations.

All-reduce (and reduce, reduce-scatter) spread the work: rank ``r`` copies
only the parts *other* ranks reduce into its slot, reduces its own part
``r`` in rank order (``x0 op x1 op ...``, so every rank gets bit-identical
results) reading the others' slots in place, publishes it, and copies the
other parts' results out: no rank does more than its 1/n share.

Any failure (timeout, dead peer) aborts the engine for every local rank, so
the others raise at once instead of waiting for their own timeout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np

from .._errors import (
    DistClosedError,
    DistError,
    DistMismatchError,
    DistPeerLostError,
    DistTimeoutError,
    DistUsageError,
)
from ._engine import Engine
from ._ops import ReduceOp, ufunc
from ._shm_cma import RemoteReader
from ._shm_native import NativeStep
from ._shm_segment import SharedSegment
from ._shm_sync import PhaseSync

__all__ = ["ShmEngine"]


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


def _bounds(count: int, parts: int) -> list[int]:
    """Offsets splitting ``count`` items into ``parts`` near-equal parts."""
    return [q * count // parts for q in range(parts + 1)]


def _describe(desc: bytes) -> str:
    """``all_reduce(shape=[3], ...)`` from a call descriptor (msgpack map)."""
    try:
        d = dict(msgpack.unpackb(desc, raw=False))
        return f"{d.pop('op')}(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"
    except Exception:
        return repr(desc)


def _bytes(buf: Any) -> np.ndarray:
    return buf.view(np.uint8)


class ShmEngine(Engine):
    """Collectives among ranks that share one segment (one machine).

    Mismatch detection (``verifies_descriptors``): each rank publishes a digest
    of the group's call descriptor in its header line; all-reduce compares them
    inside its first step (free), other collectives run one extra barrier step.

    Args:
        segment: this process's mapping of the node's segment.
        rank, size: local rank and number of local ranks.
        global_ranks: group rank of each local rank (for error messages).
        pids: process id of each local rank (liveness).
        p2p: engine for ``send``/``recv`` (point-to-point is not collective,
            so it does not fit the lock-step pipeline); ``None`` refuses them.
        check_failed: raises a failure another rank published (polled while waiting).
        store: the group's store, used only to name both calls in a mismatch error.
        verify: compare call descriptors across ranks (``DISTRIB_CHECK_MISMATCH``).
        cma: every local rank can ``process_vm_readv`` every other (probed at
            rendezvous): large all-reduces then read peers' buffers directly.
        native: the C step's function from ``_shm_native.load`` (agreed by
            every local rank at rendezvous), or ``None`` for the numpy path.
    """

    def __init__(
        self,
        segment: SharedSegment,
        rank: int,
        size: int,
        global_ranks: list[int],
        pids: list[int],
        p2p: Engine | None = None,
        check_failed: Callable[[], None] | None = None,
        store: Any = None,
        verify: bool = True,
        cma: bool = False,
        native: Any = None,
    ) -> None:
        self.rank = rank
        self._native: NativeStep | None = None
        self._pids = pids
        self._reader = RemoteReader() if cma else None
        self.verifies_descriptors = verify
        self._store = store  # only to show both descriptors in a mismatch error
        self._digest_of: tuple[bytes, int] = (b"", 0)
        self.size = size
        self._seg = segment
        self._global = global_ranks
        self._sync = PhaseSync(
            segment.header, segment.addr, rank, size, global_ranks, pids, check_failed=check_failed
        )
        self._sync.publish_pid()
        if native is not None and 2 <= size <= NativeStep.MAX_RANKS:
            lay = segment.layout
            halves = [
                [segment.addr + lay.slot_offset(q) + h * lay.half_bytes for q in range(size)]
                for h in (0, 1)
            ]
            counters, waiting = self._sync.native_words()
            self._native = NativeStep(native, halves, counters, waiting, rank)
        self._part_bytes = segment.layout.part_bytes
        self._half_bytes = segment.layout.half_bytes
        self._step = 0  # pipeline steps completed; identical on every local rank
        self._p2p = p2p
        self._closed = False

    # -- step bookkeeping --------------------------------------------------
    def _begin(self, op: str, deadline: float) -> int:
        if self._closed:
            raise DistClosedError(
                f"{op}: the shared-memory engine of rank {self._global[self.rank]} is closed",
                rank=self._global[self.rank],
                op=op,
            )
        self._sync.check(op)  # aborted (here or by another local rank): fail now
        k = self._step
        if k >= 2:
            # The half we are about to overwrite was read during step k-2, and
            # this op may lay it out differently; wait until every rank has
            # started step k-1 (signalled 2k-1), i.e. finished step k-2.
            self._sync.wait_all(2 * k - 1, op, deadline)
        return k

    def _run(self, op: str, deadline: float, body: Any, *args: Any, check: bool = True) -> None:
        """Run ``body(*args)`` (after a descriptor check step); abort everyone on failure."""
        try:
            if check and self.verifies_descriptors:
                self._check_step(op, deadline)
            body(*args)
        except DistClosedError:
            raise
        except DistError as exc:
            # tell the other local ranks at once, naming the rank at fault
            culprit = None
            if isinstance(exc, (DistPeerLostError, DistTimeoutError)):
                culprit = exc.peer
            self._sync.abort(f"rank {self._global[self.rank]} failed in {op}: {exc}", culprit)
            raise
        except BaseException as exc:
            self._sync.abort(f"rank {self._global[self.rank]} failed in {op}: {exc!r}")
            raise

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

    def _part(self, dtype: np.dtype) -> int:
        return max(1, self._part_bytes // dtype.itemsize)

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

    # -- mismatch detection ----------------------------------------------------
    def _digest(self) -> int:
        desc = self.call_descriptor
        if self._digest_of[0] is not desc:
            d = int.from_bytes(hashlib.blake2b(desc, digest_size=8).digest(), "little")
            self._digest_of = (desc, d)
        return self._digest_of[1]

    def _compare_digest(self, q: int, h: int, k: int, name: str) -> None:
        if self._sync.digest(q, h) == self._digest_of[1]:
            return
        me, other = self._global[self.rank], self._global[q]
        theirs = "a different collective"
        if self._store is not None:
            try:
                self._store.set(f"shm/desc/{k}/{me}", self.call_descriptor)
                self._store.wait([f"shm/desc/{k}/{other}"], 5.0)
                theirs = _describe(self._store.get(f"shm/desc/{k}/{other}"))
            except Exception:
                pass
        raise DistMismatchError(
            f"{name}: mismatched collectives: rank {me} called "
            f"{_describe(self.call_descriptor)} but rank {other} called {theirs}",
            rank=me,
            op=name,
            peer=other,
        )

    def _check_step(self, name: str, deadline: float) -> None:
        """One barrier step that compares every rank's call digest."""
        digest = self._digest()
        k = self._begin(name, deadline)
        h = k & 1
        self._sync.publish_digest(h, digest)
        self._sync.signal(2 * k + 1)
        for q in range(self.size):
            if q != self.rank:
                self._sync.wait(q, 2 * k + 1, name, deadline)
                self._compare_digest(q, h, k, name)
        self._sync.signal(2 * k + 2)
        self._step = k + 1

    # -- reductions ----------------------------------------------------------
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
                check=buf.size == 0,  # else compared inside the first step
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
                check=buf.size == 0,
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
            verify = start == 0 and self.verifies_descriptors
            if verify:
                sync.publish_digest(h, self._digest())
            sync.signal(2 * k + 1)
            # 2. reduce my part in rank order, reading the others' slots in place
            lo, hi = b[r], b[r + 1]
            acc = mine[lo:hi]
            first = True
            prev = None
            for q in range(n):
                if q != r:
                    sync.wait(q, 2 * k + 1, name, deadline)
                    if verify:
                        self._compare_digest(q, h, k, name)
                src = chunk[lo:hi] if q == r else slots[q][h][lo:hi]
                if prev is None:
                    prev = src
                elif first:
                    fn(prev, src, out=acc)
                    first = False
                else:
                    fn(acc, src, out=acc)
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
        verify = self.verifies_descriptors
        if verify:
            sync.publish_digest(h, self._digest())
        sync.signal(2 * k + 1)
        for q in range(n):
            if q != r:
                sync.wait(q, 2 * k + 1, name, deadline)
                if verify:
                    self._compare_digest(q, h, k, name)
        if root is None or root == r:
            fn(slots[0][h][:count], slots[1][h][:count], out=buf)
            for q in range(2, n):
                fn(buf, slots[q][h][:count], out=buf)
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
            verify = start == 0 and self.verifies_descriptors
            if verify:
                sync.publish_digest(h, self._digest())
            stage = native(0, dtype, op, chunk, h, k, spin, verify)
            while stage != 0:
                if stage == 1:  # a peer has not published its inputs yet
                    sync.wait(native.blocked_on, 2 * k + 1, name, deadline)
                elif stage == 2:  # every peer's inputs are there: compare the calls first
                    for q in range(self.size):
                        if q != self.rank:
                            self._compare_digest(q, h, k, name)
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
            verify = first and self.verifies_descriptors
            if first:
                sync.publish_addr(base)
            if verify:
                sync.publish_digest(h, self._digest())
            sync.signal(2 * k + 1)
            lo, hi = b[r], b[r + 1]
            own = chunk[lo:hi]
            spare = mine[lo:hi]  # my slot's own part: nobody else reads it
            prev = acc = None
            for q in range(n):
                if q == r:
                    src = own
                else:
                    sync.wait(q, 2 * k + 1, name, deadline)
                    if verify:
                        self._compare_digest(q, h, k, name)
                    src = slots[q][h][lo:hi]
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
            dst = out[start : start + c]
            prev = None
            first = True
            for q in range(n):
                if q != r:
                    sync.wait(q, 2 * k + 1, name, deadline)
                src = (
                    buf[r * m + start : r * m + start + c]
                    if q == r
                    else slots[q][h][r * part : r * part + c]
                )
                if prev is None:
                    prev = src
                elif first:
                    fn(prev, src, out=dst)
                    first = False
                else:
                    fn(dst, src, out=dst)
            sync.signal(2 * k + 2)
            self._step = k + 1

    # -- data movement -------------------------------------------------------
    def broadcast(self, buf: Any, root: int, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run("broadcast", deadline, self._broadcast, _bytes(buf), root, deadline)

    def _broadcast(self, data: np.ndarray, root: int, deadline: float) -> None:
        r, sync, name = self.rank, self._sync, "broadcast"
        src = self._seg.slots(np.dtype(np.uint8))[root]
        step = self._half_bytes
        for start in range(0, data.size, step):
            chunk = data[start : start + step]
            k = self._begin(name, deadline)
            h = k & 1
            if r == root:
                np.copyto(src[h][: chunk.size], chunk)
            else:
                sync.wait(root, 2 * k + 1, name, deadline)
                np.copyto(chunk, src[h][: chunk.size])
            sync.signal(2 * k + 2)
            self._step = k + 1

    def all_gather(self, out: Any, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run("all_gather", deadline, self._all_gather, _bytes(out), deadline)

    def _all_gather(self, data: np.ndarray, deadline: float) -> None:
        n, r, sync, name = self.size, self.rank, self._sync, "all_gather"
        slots = self._seg.slots(np.dtype(np.uint8))
        m = data.size // n
        step = self._half_bytes
        for start in range(0, m, step):
            c = min(step, m - start)
            k = self._begin(name, deadline)
            h = k & 1
            np.copyto(slots[r][h][:c], data[r * m + start : r * m + start + c])
            sync.signal(2 * k + 1)
            for q in range(n):
                if q != r:
                    sync.wait(q, 2 * k + 1, name, deadline)
                    np.copyto(data[q * m + start : q * m + start + c], slots[q][h][:c])
            sync.signal(2 * k + 2)
            self._step = k + 1

    def gather(self, buf: Any, out: Any | None, root: int, seq: int, deadline: float) -> None:
        if self.size == 1:
            if out is not None:
                np.copyto(out, buf)
            return
        dst = None if out is None or self.rank != root else _bytes(out)
        self._run("gather", deadline, self._gather, _bytes(buf), dst, root, deadline)

    def _gather(self, data: np.ndarray, out: np.ndarray | None, root: int, deadline: float) -> None:
        n, r, sync, name = self.size, self.rank, self._sync, "gather"
        slots = self._seg.slots(np.dtype(np.uint8))
        m = data.size
        step = self._half_bytes
        for start in range(0, m, step):
            c = min(step, m - start)
            k = self._begin(name, deadline)
            h = k & 1
            if r != root:
                np.copyto(slots[r][h][:c], data[start : start + c])
            else:
                assert out is not None
                np.copyto(out[r * m + start : r * m + start + c], data[start : start + c])
                for q in range(n):
                    if q != r:
                        sync.wait(q, 2 * k + 1, name, deadline)
                        np.copyto(out[q * m + start : q * m + start + c], slots[q][h][:c])
            sync.signal(2 * k + 2)
            self._step = k + 1

    def scatter(self, buf: Any | None, out: Any, root: int, seq: int, deadline: float) -> None:
        if self.size == 1:
            if buf is not None:
                np.copyto(out, buf)
            return
        src = _bytes(buf) if self.rank == root else None
        self._run("scatter", deadline, self._scatter, src, _bytes(out), root, deadline)

    def _scatter(
        self, data: np.ndarray | None, out: np.ndarray, root: int, deadline: float
    ) -> None:
        n, r, sync, name = self.size, self.rank, self._sync, "scatter"
        slots = self._seg.slots(np.dtype(np.uint8))
        m = out.size
        part = self._part_bytes
        for start in range(0, m, part):
            c = min(part, m - start)
            k = self._begin(name, deadline)
            h = k & 1
            if r == root:
                assert data is not None
                for q in range(n):
                    src = data[q * m + start : q * m + start + c]
                    if q == r:
                        np.copyto(out[start : start + c], src)
                    else:
                        np.copyto(slots[r][h][q * part : q * part + c], src)
            else:
                sync.wait(root, 2 * k + 1, name, deadline)
                np.copyto(out[start : start + c], slots[root][h][r * part : r * part + c])
            sync.signal(2 * k + 2)
            self._step = k + 1

    def all_to_all(self, buf: Any, out: Any, seq: int, deadline: float) -> None:
        if self.size == 1:
            np.copyto(out, buf)
            return
        self._run("all_to_all", deadline, self._all_to_all, _bytes(buf), _bytes(out), deadline)

    def _all_to_all(self, data: np.ndarray, out: np.ndarray, deadline: float) -> None:
        n, r, sync, name = self.size, self.rank, self._sync, "all_to_all"
        slots = self._seg.slots(np.dtype(np.uint8))
        m = data.size // n
        part = self._part_bytes
        for start in range(0, m, part):
            c = min(part, m - start)
            k = self._begin(name, deadline)
            h = k & 1
            mine = slots[r][h]
            for q in range(n):
                src = data[q * m + start : q * m + start + c]
                if q == r:
                    np.copyto(out[r * m + start : r * m + start + c], src)
                else:
                    np.copyto(mine[q * part : q * part + c], src)
            sync.signal(2 * k + 1)
            for q in range(n):
                if q != r:
                    sync.wait(q, 2 * k + 1, name, deadline)
                    np.copyto(
                        out[q * m + start : q * m + start + c], slots[q][h][r * part : r * part + c]
                    )
            sync.signal(2 * k + 2)
            self._step = k + 1

    def barrier(self, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run("barrier", deadline, self._barrier, deadline)

    def _barrier(self, deadline: float, name: str = "barrier") -> None:
        k = self._begin(name, deadline)
        self._sync.signal(2 * k + 1)
        self._sync.wait_all(2 * k + 1, name, deadline)
        self._sync.signal(2 * k + 2)
        self._step = k + 1

    # -- point to point --------------------------------------------------------
    def send(self, buf: Any, dst: int, tag: int, deadline: float) -> None:
        self._p2p_engine("send").send(buf, dst, tag, deadline)

    def recv(self, buf: Any, src: int, tag: int, deadline: float) -> None:
        self._p2p_engine("recv").recv(buf, src, tag, deadline)

    def set_p2p(self, engine: Engine) -> None:
        """Use ``engine`` for ``send``/``recv`` (and close it with this one)."""
        self._p2p = engine

    def _p2p_engine(self, op: str) -> Engine:
        if self._p2p is None:
            raise DistUsageError(
                f"{op}: this shared-memory engine (rank {self._global[self.rank]}) has no "
                "point-to-point transport; use the ZeroMQ engine (DISTRIB_TRANSPORT=zmq)",
                rank=self._global[self.rank],
                op=op,
            )
        return self._p2p

    # -- lifecycle -------------------------------------------------------------
    def abort(self, reason: str) -> None:
        self._sync.abort(reason)
        if self._p2p is not None:
            self._p2p.abort(reason)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sync.close()
        self._seg.close()
        if self._p2p is not None:
            self._p2p.close()
