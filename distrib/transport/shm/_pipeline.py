"""The step pipeline under every shared-memory collective of one machine.

Every collective is a pipeline of *steps*. In step ``k`` each rank uses half
``k % 2`` of its own slot in the node's segment (``_segment``): it writes
what the others need, signals phase ``2k+1``, reads what it needs straight out
of the others' slots, and signals phase ``2k+2`` (``_sync``). A step moves
at most ``size * part_bytes`` bytes, so each rank's share stays cache-sized,
and two halves let step ``k+1`` fill while step ``k`` drains. Before writing a
half again (step ``k+2``) a rank waits until everyone signalled ``2k+3``, i.e.
finished step ``k`` entirely (the next op may split the half differently).
Every rank signals ``2k+2`` in every step of every collective, so the counters
stay in lock-step across operations.

So every algorithm runs each of its steps in this order::

    k = pipe.begin(op, deadline)   # closed/aborted? fail; k >= 2: wait for 2k-1
    h = k & 1                      # the half of each slot this step uses
    ... write my half; pipe.sync.signal(2k+1)
    ... wait for a peer's 2k+1, read its half
    pipe.sync.signal(2k+2); pipe.step = k + 1

``SlotPipeline.chunks`` is that loop for an algorithm that moves a buffer a
chunk per step: it begins each step, yields it, and ends it.

``SlotPipeline`` is that shared state of one group's local ranks: the segment
mapping, ``PhaseSync``, the step counter, part sizes, the optional C step and
cross-process reader, and the steps every collective shares (call agreement,
barrier). It is not an engine: ``ShmEngine`` (``_engine``) has one and hands
each call to an algorithm, a plain function ``f(pipe, ...)`` in ``_reduce``
(reductions) or ``_move`` (data movement), through ``SlotPipeline.run``. That
wrapper turns any failure into an abort of every local rank, so the others
raise at once instead of waiting for their own timeout.

Lifetime of the segment: ``_rendezvous.connect_local`` maps it (creating it on
the node's first rank) and hands it to ``ShmEngine``, which hands it here; the
pipeline owns it from then on and unmaps it in ``close`` (the memory itself
lives until the last local rank unmaps it or exits). After ``close`` every
``begin`` raises ``DistClosedError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from ..._errors import (
    DistClosedError,
    DistError,
    DistMismatchError,
    DistPeerLostError,
    DistTimeoutError,
)
from .._calldesc import MAX_PACKED, CallDesc, CallsDiffer, digest, pack, unpack
from ._cma import RemoteReader
from ._native import NativeStep
from ._segment import SharedSegment
from ._stores import StoreChooser
from ._sync import PhaseSync

__all__ = ["Chunk", "SlotPipeline"]


class Chunk(NamedTuple):
    """One step of ``SlotPipeline.chunks``: items ``[start, start + length)`` in step
    ``k``, which uses half ``half`` of every slot."""

    start: int
    length: int
    k: int
    half: int


class SlotPipeline:
    """Step bookkeeping, call agreement, barrier and lifecycle of one group's local ranks.

    Call agreement: each rank publishes the digest of its call descriptor in
    its header line; reductions compare them inside their first step
    (``check_calls``), other collectives run one extra barrier step
    (``agree``). When digests differ every rank sees it in the same step, and
    all run one more step that exchanges the packed descriptors through their
    slots, so each names both sides' calls without waiting on anyone.

    Args:
        segment: this process's mapping of the node's segment (owned from now on).
        rank, size: local rank and number of local ranks.
        global_ranks: group rank of each local rank (for error messages).
        pids: process id of each local rank (liveness, cross-process reads).
        check_failed: raises a failure another rank published (polled while waiting).
        cma: every local rank can ``process_vm_readv`` every other (probed at
            rendezvous): large all-reduces then read peers' buffers directly.
        native: the C library from ``_native.load`` (agreed by every local
            rank at rendezvous), or ``None`` for the numpy path.
    """

    def __init__(
        self,
        segment: SharedSegment,
        rank: int,
        size: int,
        global_ranks: list[int],
        pids: list[int],
        check_failed: Callable[[], None] | None = None,
        cma: bool = False,
        native: Any = None,
    ) -> None:
        self.rank = rank
        self.size = size
        self.global_ranks = global_ranks
        self.me = global_ranks[rank]  # this rank's group rank, for messages
        self.pids = pids
        self.seg = segment
        self.sync = PhaseSync(
            segment.header, segment.addr, rank, size, global_ranks, pids, check_failed=check_failed
        )
        self.sync.publish_pid()
        self.reader = RemoteReader() if cma else None
        self.native: NativeStep | None = None
        if native is not None and 2 <= size <= NativeStep.MAX_RANKS:
            lay = segment.layout
            halves = [
                [segment.addr + lay.slot_offset(q) + h * lay.half_bytes for q in range(size)]
                for h in (0, 1)
            ]
            counters, waiting = self.sync.native_words()
            self.native = NativeStep(native, halves, counters, waiting, rank)
        # How the two staged all-reduce paths write into the segment (_stores):
        # each path's messages differ in size, so each measures its own costs.
        self.native_stores = StoreChooser(streaming=self.native is not None)
        self.pull_stores = StoreChooser(streaming=self.native is not None)
        self.part_bytes = segment.layout.part_bytes
        self.half_bytes = segment.layout.half_bytes
        self.step = 0  # pipeline steps completed; identical on every local rank
        self.closed = False

    # -- step bookkeeping --------------------------------------------------
    def begin(self, op: str, deadline: float) -> int:
        """Start the next step and return its number ``k`` (it uses half ``k & 1``)."""
        if self.closed:
            raise DistClosedError(
                f"{op}: the shared-memory engine of rank {self.me} is closed",
                rank=self.me,
                op=op,
            )
        self.sync.check(op)  # aborted (here or by another local rank): fail now
        k = self.step
        if k >= 2:
            # The half we are about to overwrite was read during step k-2, and
            # this op may lay it out differently; wait until every rank has
            # started step k-1 (signalled 2k-1), i.e. finished step k-2.
            self.sync.wait_all(2 * k - 1, op, deadline)
        return k

    def chunks(self, op: str, total: int, chunk: int, deadline: float) -> Iterator[Chunk]:
        """The steps of a collective that moves ``total`` items ``chunk`` at a time.

        Each step is yielded as a ``Chunk`` for the caller to write, signal ``2k+1``
        and read; when the caller asks for the next one, the step ends here (signal
        ``2k+2``, advance). An exception in the caller leaves the step unfinished,
        as the abort that follows expects.
        """
        for start in range(0, total, chunk):
            k = self.begin(op, deadline)
            yield Chunk(start, min(chunk, total - start), k, k & 1)
            self.sync.signal(2 * k + 2)
            self.step = k + 1

    def run(self, op: str, deadline: float, body: Callable[..., None], *args: Any) -> None:
        """Run the algorithm ``body(self, *args)``; abort everyone on failure (but a
        disagreement on the call, which every rank detects in the same step or reads
        from the store, aborts no one)."""
        try:
            body(self, *args)
        except (DistClosedError, CallsDiffer, DistMismatchError):
            raise
        except DistError as exc:
            # tell the other local ranks at once, naming the rank at fault
            culprit = None
            if isinstance(exc, (DistPeerLostError, DistTimeoutError)):
                culprit = exc.peer
            self.sync.abort(f"rank {self.me} failed in {op}: {exc}", culprit)
            raise
        except BaseException as exc:
            self.sync.abort(f"rank {self.me} failed in {op}: {exc!r}")
            raise

    def part(self, dtype: np.dtype) -> int:
        """Elements of ``dtype`` in one rank's part of a half."""
        return max(1, self.part_bytes // dtype.itemsize)

    # -- shared steps ----------------------------------------------------------
    def barrier(self, deadline: float, name: str = "barrier") -> None:
        """One step in which nobody writes: returns once every rank has begun it."""
        k = self.begin(name, deadline)
        self.sync.signal(2 * k + 1)
        self.sync.wait_all(2 * k + 1, name, deadline)
        self.sync.signal(2 * k + 2)
        self.step = k + 1

    def agree(self, call: CallDesc, deadline: float) -> None:
        """One barrier step that publishes and compares every rank's call digest."""
        k = self.begin(call.op, deadline)
        h = k & 1
        self.sync.publish_digest(h, digest(call))
        self.sync.signal(2 * k + 1)
        self.check_calls(call, k, h, deadline)
        self.sync.signal(2 * k + 2)
        self.step = k + 1

    def check_calls(self, call: CallDesc, k: int, h: int, deadline: float) -> None:
        """In step ``k`` (this rank published ``digest(call)`` in half ``h`` and signalled
        ``2k+1``): wait for every peer's digest and compare; on any difference finish
        the step, exchange the descriptors in the next one and raise ``CallsDiffer``."""
        mine = digest(call)
        differ = False
        for q in range(self.size):
            if q != self.rank:
                self.sync.wait(q, 2 * k + 1, call.op, deadline)
                differ = differ or self.sync.digest(q, h) != mine
        if not differ:
            return
        # Every rank has a peer whose digest differs from its own, so every rank is here.
        self.sync.signal(2 * k + 2)
        self.step = k + 1
        self._exchange_calls(call, deadline)

    def _exchange_calls(self, call: CallDesc, deadline: float) -> None:
        k = self.begin(call.op, deadline)
        h = k & 1
        slots = self.seg.slots(np.dtype(np.uint8))
        mine = slots[self.rank][h]
        room = min(mine.size - 2, MAX_PACKED)
        raw = pack(call)
        if len(raw) > room:  # a tiny test segment: drop the group list, then give up
            raw = pack(call._replace(group=()))
            raw = raw if len(raw) <= room else b""
        mine[:2] = np.frombuffer(len(raw).to_bytes(2, "little"), np.uint8)
        mine[2 : 2 + len(raw)] = np.frombuffer(raw, np.uint8)
        self.sync.signal(2 * k + 1)
        calls: list[CallDesc | None] = []
        for q in range(self.size):
            if q == self.rank:
                calls.append(call)
                continue
            self.sync.wait(q, 2 * k + 1, call.op, deadline)
            theirs = slots[q][h]
            length = min(int.from_bytes(theirs[:2].tobytes(), "little"), room)
            calls.append(unpack(theirs[2 : 2 + length].tobytes()))
        self.sync.signal(2 * k + 2)
        self.step = k + 1
        raise CallsDiffer(calls, call.op)

    # -- cross-process reads ---------------------------------------------------
    def pull(self, q: int, addr: int, dst: np.ndarray, name: str) -> None:
        """Copy ``dst.nbytes`` at ``addr`` in local rank ``q``'s memory into ``dst``
        (only with ``cma``). An instance may replace it (tests simulate a crash)."""
        assert self.reader is not None
        try:
            self.reader.read(self.pids[q], addr, dst.ctypes.data, dst.nbytes)
        except DistError as exc:
            # If another rank already failed and aborted, q may just have returned
            # (and exited): report the original problem, not q.
            self.sync.check(name, q)
            peer = self.global_ranks[q]
            raise DistPeerLostError(
                f"{name}: rank {self.me} could not read rank {peer}'s buffer (pid "
                f"{self.pids[q]}), which has probably exited: {exc}",
                rank=self.me,
                op=name,
                peer=peer,
            ) from exc

    # -- lifecycle -------------------------------------------------------------
    def abort(self, reason: str, culprit: int | None = None) -> None:
        """Make this rank's and every local peer's blocked and future steps fail."""
        self.sync.abort(reason, culprit)

    def close(self) -> None:
        """Stop the pipeline and unmap the segment; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.sync.close()
        self.seg.close()
