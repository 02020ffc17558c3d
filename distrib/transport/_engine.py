"""The one interface every collective backend implements.

A ``ProcessGroup`` validates arguments, checks that ranks agree (mismatch
detection), orders operations on its progress thread and turns results into
``Work`` objects; an ``Engine`` only moves contiguous 1-D buffers among the
group's ranks. Engines: the ZeroMQ ring (reference, any host layout), the
intra-node shared-memory engine, the hierarchical composition of the two, and
on GPUs NCCL and the CUDA-IPC engine for ranks that share one device.

Contract for every method:
- buffers are C-contiguous, 1-D, of one numeric dtype, identical in dtype and
  length on every rank unless the method says otherwise (the group has checked);
- ``deadline`` is an absolute ``time.monotonic()`` value; past it the engine
  raises ``DistTimeoutError`` naming its rank, the operation and the peer it was
  waiting for; a peer known to be gone raises ``DistPeerLostError``;
- methods are called from one thread at a time (the group's progress thread),
  in the same order on every rank; ``seq`` is the group's operation counter,
  identical on every rank for the same call, usable to tag messages;
- ``rank`` / ``size`` are group-local (0 .. size-1);
- everything a method needs about the call in progress comes in its arguments
  (the call descriptor as ``call=``, see ``Engine``): engines keep no per-call state
  that a caller sets beforehand.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .._errors import DistBackendError
from .._reduce_op import ReduceOp
from ._calldesc import MAX_PACKED, CallDesc, CallsDiffer, digest, pack, unpack

__all__ = ["Engine", "EngineContext", "SmallPath"]


@dataclass
class EngineContext:
    """Everything an engine needs to set itself up for one group.

    Attributes:
        store: the group's own (prefixed) store; keys are private to the group.
        rank, size: this process's group rank and the group size.
        global_ranks: global rank of each group rank (for messages).
        timeout: the group's timeout in seconds.
        host_ids: ``boot_id/hostname`` of each group rank, exchanged at group
            creation: equal ids mean the ranks share a machine (and memory).
        bind_host: the address this rank's sockets listen on (reachable by peers).
        transport: ``DISTRIB_TRANSPORT`` (``auto``, ``zmq`` or ``shm``).
        check_failed: raises the error another rank published for this group,
            if any (engines call it while blocked, at most a few times a second).
        make_zmq_engine: builds the group's ZeroMQ engine (the hierarchical
            engine uses it across hosts); each call returns the same engine.
        diagnose_timeout: ``(peer, seq) -> chain`` after timing out on ``peer`` in
            op ``seq``: records the wait and follows other ranks' recorded waits
            (briefly) to the rank that is really stuck; returns ``[peer, ..., culprit]``.
        wake_fd: readable (a byte written) when an operation is issued to the group
            while a point-to-point wait that may step aside for it runs: such waits
            watch it beside their sockets and read it empty (``None``: no such fd).
    """

    store: Any
    rank: int
    size: int
    global_ranks: list[int]
    timeout: float
    host_ids: list[str]
    bind_host: str = "127.0.0.1"
    transport: str = "auto"
    check_failed: Callable[[], None] = field(default=lambda: None)
    make_zmq_engine: Callable[[], Engine] = field(default=lambda: _no_zmq())
    diagnose_timeout: Callable[[int, int], list[int]] = field(default=lambda peer, seq: [peer])
    wake_fd: int | None = None


class SmallPath(Protocol):
    """A small all-reduce in one compiled call (see ``shm/_small``).

    ``step(stage, array, op_code, digest, verify)`` runs it from ``stage`` (0 to
    start) and returns 0 when done, -1 when it does not apply (nothing was
    touched), else a code that ``finish`` completes (waiting, naming a mismatch).
    """

    step: Callable[[int, Any, int, int, bool], int]
    op_codes: dict[ReduceOp, int]  # the reduce ops it implements, as ``step`` takes them

    def finish(
        self,
        code: int,
        buf: Any,
        op_code: int,
        digest: int,
        verify: bool,
        call: CallDesc | None,
        deadline: float,
    ) -> None: ...


def _no_zmq() -> Engine:
    raise DistBackendError("this EngineContext cannot build a ZeroMQ engine", op="engine")


class Engine(ABC):
    """Moves contiguous buffers among the ranks of one group.

    Mismatch detection: before each collective the group makes the ranks agree
    on the call's ``CallDesc`` with ``agree`` (one primitive, implemented per
    transport; the default all-gathers 64-bit digests). For the collectives
    named in ``fused_agreement`` the group instead passes the descriptor to the
    collective itself and the engine compares digests inside its own first
    step, still before writing any user byte.

    Every collective and point-to-point method therefore takes a keyword-only
    ``call`` argument (required, so no caller forgets it):

    - collectives: the ``CallDesc`` the engine must check inside its own first
      step when the op is in ``fused_agreement``; ``None`` when nothing is left
      to check (the ranks already agreed, mismatch checks are off, or the caller
      drives the engine directly). An engine without fused agreement ignores it.
    - ``send``: the descriptor to send with the data (``None``: one built from
      the buffer's length and dtype); ``recv``: the descriptor the sender's is
      compared with (``None``: likewise built from the buffer).

    The call is an argument, not engine state: an engine holds nothing about the
    operation in progress between calls.
    """

    rank: int
    size: int
    fused_agreement: frozenset[str] = frozenset()

    def agree(self, call: CallDesc, seq: int, deadline: float) -> None:
        """Return when every rank passed an equal ``call`` for op ``seq``; otherwise raise
        ``CallsDiffer`` with every rank's call, on every rank.

        Default: all-gather the digests; only when they differ (every rank sees that)
        all-gather the packed descriptors, to name both sides' calls.
        """
        digests = np.zeros(self.size, np.int64)
        digests[self.rank] = digest(call)
        self.all_gather(digests, seq, deadline, call=None)
        if (digests == digests[0]).all():
            return
        width = MAX_PACKED + 2
        raw = np.zeros(self.size * width, np.uint8)
        mine = pack(call)
        at = self.rank * width
        raw[at : at + 2] = np.frombuffer(len(mine).to_bytes(2, "little"), np.uint8)
        raw[at + 2 : at + 2 + len(mine)] = np.frombuffer(mine, np.uint8)
        self.all_gather(raw, seq, deadline, call=None)
        calls: list[CallDesc | None] = []
        for q in range(self.size):
            block = raw[q * width : (q + 1) * width].tobytes()
            calls.append(unpack(block[2 : 2 + int.from_bytes(block[:2], "little")]))
        calls[self.rank] = call
        raise CallsDiffer(calls, call.op)

    @abstractmethod
    def all_reduce(
        self, buf: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        """Reduce ``buf`` across ranks in place; every rank ends with the result."""

    @abstractmethod
    def broadcast(
        self, buf: Any, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        """Copy root's ``buf`` into every other rank's ``buf``."""

    @abstractmethod
    def reduce(
        self, buf: Any, op: ReduceOp, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        """Reduce into root's ``buf``; other ranks' ``buf`` may be used as scratch."""

    @abstractmethod
    def all_gather(self, out: Any, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        """``out`` has size*m elements; on entry rank r's block r holds its input; fill the rest."""

    @abstractmethod
    def reduce_scatter(
        self, buf: Any, out: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        """``buf`` has size*m elements; rank r gets the reduction of block r in ``out`` (m)."""

    @abstractmethod
    def gather(
        self,
        buf: Any,
        out: Any | None,
        root: int,
        seq: int,
        deadline: float,
        *,
        call: CallDesc | None,
    ) -> None:
        """Root's ``out`` (size*m) gets every rank's ``buf`` (m) in rank order."""

    @abstractmethod
    def scatter(
        self,
        buf: Any | None,
        out: Any,
        root: int,
        seq: int,
        deadline: float,
        *,
        call: CallDesc | None,
    ) -> None:
        """Rank r's ``out`` (m) gets block r of root's ``buf`` (size*m)."""

    @abstractmethod
    def all_to_all(
        self, buf: Any, out: Any, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        """Block j of rank i's ``buf`` (size*m) lands in block i of rank j's ``out``."""

    @abstractmethod
    def barrier(self, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        """Return once every rank has entered."""

    @abstractmethod
    def send(self, buf: Any, dst: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        """Point-to-point send; matched with ``recv`` by (source, tag) in order."""

    @abstractmethod
    def recv(self, buf: Any, src: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        """Point-to-point receive into ``buf``."""

    def abort(  # noqa: B027 - optional hook
        self, reason: str, culprit: int | None = None, cls_name: str = ""
    ) -> None:
        """Make blocked and future calls fail fast and tell the peers: ``culprit`` is the
        global rank whose failure this rank's follows (``None``: this rank's own),
        ``cls_name`` the error class the peers should raise."""

    def await_p2p(self, src: int, tag: int, deadline: float, give_way: Callable[[], bool]) -> bool:
        """Wait until a point-to-point message from ``src`` with ``tag`` is here (True) or
        ``give_way()`` is true (False): a receive posted before its send then steps aside
        for work issued after it. An engine that cannot tell answers True at once (its
        ``recv`` blocks)."""
        return True

    def has_p2p(self, src: int, tag: int) -> bool:
        """Whether a point-to-point message from ``src`` with ``tag`` has been read off
        the network already (never waits, never reads): a queued receive for it would
        finish if it ran now. An engine that cannot tell answers True."""
        return True

    def has_verdict(self, dst: int, tag: int, n: int) -> bool:
        """Whether the receiver's verdict on send number ``n`` to ``dst`` with ``tag``
        has been read already (never waits, never reads); True where unknown."""
        return True

    def last_send(self, dst: int, tag: int) -> int:
        """Number of the latest ``send`` to ``dst`` with ``tag``; 0 when sends are not
        confirmed by this engine."""
        return 0

    def confirm_send(
        self,
        dst: int,
        tag: int,
        n: int,
        call: CallDesc | None,
        deadline: float,
        give_way: Callable[[], bool] | None = None,
    ) -> bool:
        """Wait until the receiver accepted send number ``n`` to ``dst`` with ``tag``
        (True); raise ``DistMismatchError`` if its ``recv`` did not match ``call``.
        Return False, unconfirmed, as soon as ``give_way()`` is true: the caller runs
        later work (perhaps the receive the peer waits for) and asks again."""
        return True

    def small_all_reduce(self) -> SmallPath | None:
        """A compiled road for small synchronous all-reduces, or ``None`` (this engine
        has none; the shared-memory engine's is ``shm/_small.SmallAllReduce``)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release sockets, shared memory and threads; idempotent."""
