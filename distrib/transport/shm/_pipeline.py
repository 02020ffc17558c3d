"""The step protocol under every shared-memory collective of one machine.

Every collective is a pipeline of *steps*. In step ``k`` each rank uses half
``k % 2`` of its own slot in the node's segment (``_shm_segment``): it writes
what the others need, signals phase ``2k+1``, reads what it needs straight out
of the others' slots, and signals phase ``2k+2`` (``_shm_sync``). A step moves
at most ``size * part_bytes`` bytes, so each rank's share stays cache-sized,
and two halves let step ``k+1`` fill while step ``k`` drains. Before writing a
half again (step ``k+2``) a rank waits until everyone signalled ``2k+3``, i.e.
finished step ``k`` entirely (the next op may split the half differently).
Every rank signals ``2k+2`` in every step of every collective, so the counters
stay in lock-step across operations.

``ShmPipeline`` holds that bookkeeping, the call agreement, the barrier,
failure handling (any failure aborts the engine for every local rank, so the
others raise at once instead of waiting for their own timeout) and lifecycle;
``_shm_reduce`` and ``_shm_engine`` build the collectives on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..._errors import (
    DistClosedError,
    DistError,
    DistMismatchError,
    DistPeerLostError,
    DistTimeoutError,
    DistUsageError,
)
from .._calldesc import MAX_PACKED, CallDesc, CallsDiffer, digest, pack, unpack
from .._engine import Engine
from ._cma import RemoteReader
from ._native import NativeStep
from ._segment import SharedSegment
from ._sync import PhaseSync

__all__ = ["ShmPipeline"]


def _bounds(count: int, parts: int) -> list[int]:
    """Offsets splitting ``count`` items into ``parts`` near-equal parts."""
    return [q * count // parts for q in range(parts + 1)]


class ShmPipeline(Engine):
    """Step bookkeeping, checks, barrier and lifecycle of the shared-memory engine.

    Call agreement: each rank publishes the digest of its call descriptor in
    its header line; reductions compare them inside their first step (free,
    ``fused_agreement``), other collectives run one extra barrier step
    (``agree``). When digests differ every rank sees it in the same step, and
    all run one more step that exchanges the packed descriptors through their
    slots, so each names both sides' calls without waiting on anyone.

    Args:
        segment: this process's mapping of the node's segment.
        rank, size: local rank and number of local ranks.
        global_ranks: group rank of each local rank (for error messages).
        pids: process id of each local rank (liveness).
        p2p: engine for ``send``/``recv`` (point-to-point is not collective,
            so it does not fit the lock-step pipeline); ``None`` refuses them.
        check_failed: raises a failure another rank published (polled while waiting).
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
        cma: bool = False,
        native: Any = None,
    ) -> None:
        self.rank = rank
        self._native: NativeStep | None = None
        self._pids = pids
        self._reader = RemoteReader() if cma else None
        self.fused_agreement = frozenset({"all_reduce", "reduce"})
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

    def _run(self, op: str, deadline: float, body: Any, *args: Any) -> None:
        """Run ``body(*args)``; abort everyone on failure (but a disagreement on the
        call, which every rank detects in the same step or reads from the store, aborts
        no one)."""
        try:
            body(*args)
        except (DistClosedError, CallsDiffer, DistMismatchError):
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

    def _part(self, dtype: np.dtype) -> int:
        return max(1, self._part_bytes // dtype.itemsize)

    # -- call agreement ------------------------------------------------------
    def agree(self, call: CallDesc, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run(call.op, deadline, self._agree_step, call, deadline)

    def _agree_step(self, call: CallDesc, deadline: float) -> None:
        """One barrier step that publishes and compares every rank's call digest."""
        k = self._begin(call.op, deadline)
        h = k & 1
        self._sync.publish_digest(h, digest(call))
        self._sync.signal(2 * k + 1)
        self._fused_check(call, k, h, deadline)
        self._sync.signal(2 * k + 2)
        self._step = k + 1

    def _fused_check(self, call: CallDesc, k: int, h: int, deadline: float) -> None:
        """In step ``k`` (this rank published ``digest(call)`` in half ``h`` and signalled
        ``2k+1``): wait for every peer's digest and compare; on any difference finish
        the step, exchange the descriptors in the next one and raise ``CallsDiffer``."""
        mine = digest(call)
        differ = False
        for q in range(self.size):
            if q != self.rank:
                self._sync.wait(q, 2 * k + 1, call.op, deadline)
                differ = differ or self._sync.digest(q, h) != mine
        if not differ:
            return
        # Every rank has a peer whose digest differs from its own, so every rank is here.
        self._sync.signal(2 * k + 2)
        self._step = k + 1
        self._exchange_calls(call, deadline)

    def _exchange_calls(self, call: CallDesc, deadline: float) -> None:
        k = self._begin(call.op, deadline)
        h = k & 1
        slots = self._seg.slots(np.dtype(np.uint8))
        mine = slots[self.rank][h]
        room = min(mine.size - 2, MAX_PACKED)
        raw = pack(call)
        if len(raw) > room:  # a tiny test segment: drop the group list, then give up
            raw = pack(call._replace(group=()))
            raw = raw if len(raw) <= room else b""
        mine[:2] = np.frombuffer(len(raw).to_bytes(2, "little"), np.uint8)
        mine[2 : 2 + len(raw)] = np.frombuffer(raw, np.uint8)
        self._sync.signal(2 * k + 1)
        calls: list[CallDesc | None] = []
        for q in range(self.size):
            if q == self.rank:
                calls.append(call)
                continue
            self._sync.wait(q, 2 * k + 1, call.op, deadline)
            theirs = slots[q][h]
            length = min(int.from_bytes(theirs[:2].tobytes(), "little"), room)
            calls.append(unpack(theirs[2 : 2 + length].tobytes()))
        self._sync.signal(2 * k + 2)
        self._step = k + 1
        raise CallsDiffer(calls, call.op)

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
        engine = self._p2p_engine("send")
        engine.call = self.call
        engine.send(buf, dst, tag, deadline)

    def recv(self, buf: Any, src: int, tag: int, deadline: float) -> None:
        engine = self._p2p_engine("recv")
        engine.call = self.call
        engine.recv(buf, src, tag, deadline)

    def last_send(self, dst: int, tag: int) -> int:
        return self._p2p.last_send(dst, tag) if self._p2p is not None else 0

    def confirm_send(
        self, dst: int, tag: int, n: int, call: CallDesc | None, deadline: float
    ) -> None:
        self._p2p_engine("send").confirm_send(dst, tag, n, call, deadline)

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
    def abort(self, reason: str, culprit: int | None = None, cls_name: str = "") -> None:
        self._sync.abort(reason, culprit)
        if self._p2p is not None:
            self._p2p.abort(reason, culprit, cls_name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sync.close()
        self._seg.close()
        if self._p2p is not None:
            self._p2p.close()
