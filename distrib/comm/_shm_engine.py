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

from typing import Any

import numpy as np

from .._errors import (
    DistClosedError,
    DistError,
    DistPeerLostError,
    DistTimeoutError,
    DistUsageError,
)
from ._engine import Engine
from ._ops import ReduceOp, ufunc
from ._shm_segment import SharedSegment
from ._shm_sync import PhaseSync

__all__ = ["ShmEngine", "make_cpu_engine"]


def _bounds(count: int, parts: int) -> list[int]:
    """Offsets splitting ``count`` items into ``parts`` near-equal parts."""
    return [q * count // parts for q in range(parts + 1)]


def _bytes(buf: Any) -> np.ndarray:
    return buf.view(np.uint8)


class ShmEngine(Engine):
    """Collectives among ranks that share one segment (one machine).

    Args:
        segment: this process's mapping of the node's segment.
        rank, size: local rank and number of local ranks.
        global_ranks: group rank of each local rank (for error messages).
        pids: process id of each local rank (liveness).
        p2p: engine for ``send``/``recv`` (point-to-point is not collective,
            so it does not fit the lock-step pipeline); ``None`` refuses them.
    """

    def __init__(
        self,
        segment: SharedSegment,
        rank: int,
        size: int,
        global_ranks: list[int],
        pids: list[int],
        p2p: Engine | None = None,
    ) -> None:
        self.rank = rank
        self.size = size
        self._seg = segment
        self._global = global_ranks
        self._sync = PhaseSync(segment.header, segment.addr, rank, size, global_ranks, pids)
        self._sync.publish_pid()
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
        k = self._step
        if k >= 2:
            # The half we are about to overwrite was read during step k-2, and
            # this op may lay it out differently; wait until every rank has
            # started step k-1 (signalled 2k-1), i.e. finished step k-2.
            self._sync.wait_all(2 * k - 1, op, deadline)
        return k

    def _run(self, op: str, body: Any, *args: Any) -> None:
        try:
            body(*args)
        except DistClosedError:
            raise
        except DistError as exc:
            # tell the other local ranks at once, naming the rank at fault
            culprit = None
            if isinstance(exc, (DistPeerLostError, DistTimeoutError)):
                culprit = self._sync.local_of(exc.peer)
            self._sync.abort(f"rank {self._global[self.rank]} failed in {op}: {exc}", culprit)
            raise
        except BaseException as exc:
            self._sync.abort(f"rank {self._global[self.rank]} failed in {op}: {exc!r}")
            raise

    def _part(self, dtype: np.dtype) -> int:
        return max(1, self._part_bytes // dtype.itemsize)

    # -- reductions ----------------------------------------------------------
    def all_reduce(self, buf: Any, op: ReduceOp, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run("all_reduce", self._reduce, buf, op, None, deadline, "all_reduce")

    def reduce(self, buf: Any, op: ReduceOp, root: int, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run("reduce", self._reduce, buf, op, root, deadline, "reduce")

    def _reduce(self, buf: Any, op: ReduceOp, root: int | None, deadline: float, name: str) -> None:
        fn = ufunc(op)
        n, r, sync = self.size, self.rank, self._sync
        slots = self._seg.slots(buf.dtype)
        step = n * self._part(buf.dtype)
        for start in range(0, buf.size, step):
            chunk = buf[start : start + step]
            b = _bounds(chunk.size, n)
            k = self._begin(name, deadline)
            h = k & 1
            mine = slots[r][h]
            # 1. publish the parts the other ranks reduce
            for q in range(n):
                if q != r and b[q] < b[q + 1]:
                    np.copyto(mine[b[q] : b[q + 1]], chunk[b[q] : b[q + 1]])
            sync.signal(2 * k + 1)
            # 2. reduce my part in rank order, reading the others' slots in place
            lo, hi = b[r], b[r + 1]
            acc = mine[lo:hi]
            first = True
            prev = None
            for q in range(n):
                if q != r:
                    sync.wait(q, 2 * k + 1, name, deadline)
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

    def reduce_scatter(self, buf: Any, out: Any, op: ReduceOp, seq: int, deadline: float) -> None:
        if self.size == 1:
            np.copyto(out, buf)
            return
        self._run("reduce_scatter", self._reduce_scatter, buf, out, op, deadline)

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
            self._run("broadcast", self._broadcast, _bytes(buf), root, deadline)

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
            self._run("all_gather", self._all_gather, _bytes(out), deadline)

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
            np.copyto(out, buf)
            return
        dst = None if out is None or self.rank != root else _bytes(out)
        self._run("gather", self._gather, _bytes(buf), dst, root, deadline)

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
            np.copyto(out, buf)
            return
        src = _bytes(buf) if self.rank == root else None
        self._run("scatter", self._scatter, src, _bytes(out), root, deadline)

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
        self._run("all_to_all", self._all_to_all, _bytes(buf), _bytes(out), deadline)

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
            self._run("barrier", self._barrier, deadline)

    def _barrier(self, deadline: float) -> None:
        k = self._begin("barrier", deadline)
        self._sync.signal(2 * k + 1)
        self._sync.wait_all(2 * k + 1, "barrier", deadline)
        self._sync.signal(2 * k + 2)
        self._step = k + 1

    # -- point to point --------------------------------------------------------
    def send(self, buf: Any, dst: int, tag: int, deadline: float) -> None:
        self._p2p_engine("send").send(buf, dst, tag, deadline)

    def recv(self, buf: Any, src: int, tag: int, deadline: float) -> None:
        self._p2p_engine("recv").recv(buf, src, tag, deadline)

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


def make_cpu_engine(ctx: Any) -> Engine | None:
    """Pick the CPU engine for a group: shared memory, hierarchical, or ``None`` (ZeroMQ)."""
    return None
