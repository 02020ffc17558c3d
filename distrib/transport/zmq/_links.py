"""ZeroMQ links among the ranks of one group: framing, matching, failure detection.

Wiring: each rank binds one ROUTER socket (TCP on ``bind_host``, plus an
abstract-namespace IPC endpoint for peers on the same machine) and publishes
its endpoints in the group's store; then it connects one DEALER per peer
(identity ``r<rank>``), IPC when the peer's host id equals its own. Rank ``a``
sends to ``b`` on its DEALER; ``b`` reads everything on its ROUTER. One TCP/IPC
connection per ordered pair keeps each sender's messages in order.

Message = ``[header, payload]``; header = ``<kind:u8, seq:i64>`` + descriptor.
``kind`` is COLLECTIVE (``seq`` = the group's op counter), AGREE (the call
agreement before op ``seq``), P2P (``seq`` = user tag, descriptor = the
sender's packed ``CallDesc``), P2P_ACK (the receiver's verdict on the n-th
P2P message with that tag) or ABORT (the sender failed; payload says whose
failure it follows). A message from another peer or for a later op is stashed
per peer until asked for; older ones are stale.

Failure detection while blocked (receiving, or waiting for zero-copy sends to
leave): a monitor on each DEALER reports a peer's disconnect (killed, closed
its sockets), confirmed after a short grace so data already sent still
arrives; a rank that fails sends ABORT to every peer before it stops, so its
neighbours blame the rank it blamed rather than its own exit; every
``FAILURE_POLL_S`` the group's store is asked whether another rank published a
failure (the store may be gone: the connections alone suffice); the deadline
bounds everything.
Zero-copy sends (large segments) are tracked and awaited before an op returns,
so a caller may reuse its buffer immediately.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from ..._errors import (
    DistClosedError,
    DistError,
    DistMismatchError,
    DistPeerLostError,
    DistTimeoutError,
)
from .._engine import EngineContext

__all__ = ["ABORT", "AGREE", "COLLECTIVE", "P2P", "P2P_ACK", "ZmqLinks"]

COLLECTIVE = 0
P2P = 1
AGREE = 2
P2P_ACK = 3
ABORT = 4
_ABORT_CLASSES = {c.__name__: c for c in (DistPeerLostError, DistTimeoutError, DistMismatchError)}
_MAX_ACKS = 4096  # unclaimed positive acks kept (an isend whose Work is never waited)
_HEADER = struct.Struct("<BqI")  # kind, seq (or tag), descriptor length
# Below this many bytes a send copies (pyzmq's own copy threshold): tracking costs more.
ZERO_COPY_MIN = 65536
# A disconnected peer is declared lost after this long without its data (lets in-flight
# messages on its other connection drain when it exits normally).
DISCONNECT_GRACE_S = 0.5
FAILURE_POLL_S = 0.2  # how often a blocked rank asks the store about failures elsewhere
_POLL_SLICE_MS = 50
_QUIET_WAIT_S = 0.02  # waits shorter than this never consult the store or the monitors


class ZmqLinks:
    """Sockets to every peer of one group, with matched, bounded receives."""

    def __init__(self, ctx: EngineContext) -> None:
        self.rank, self.size = ctx.rank, ctx.size
        self.global_ranks = ctx.global_ranks
        self._check_failed = ctx.check_failed
        self._diagnose_timeout = ctx.diagnose_timeout
        self._zctx: zmq.Context = zmq.Context.instance()
        self._closed = False
        self._stash: dict[int, deque[tuple[int, int, bytes, Any]]] = {
            p: deque() for p in range(self.size)
        }
        self._trackers: list[tuple[int, Any]] = []
        self._acks: dict[tuple[int, int, int], bytes] = {}  # (peer, tag, n) -> verdict
        # Positive acks dropped to bound memory: the highest such n per (peer, tag). Acks
        # of one (peer, tag) arrive in order and negative ones are never dropped, so an
        # n at or below it with no entry in _acks was a positive ack.
        self._acked_upto: dict[tuple[int, int], int] = {}
        self._lost_since: dict[int, float] = {}
        self._connected: set[int] = set()
        self._next_failure_poll = 0.0
        self.router = self._zctx.socket(zmq.ROUTER)
        self._tune(self.router)
        me = f"{ctx.host_ids[self.rank]}"
        tcp_host = f"[{ctx.bind_host}]" if ":" in ctx.bind_host else ctx.bind_host
        if ":" in ctx.bind_host:
            self.router.setsockopt(zmq.IPV6, 1)
        port = self.router.bind_to_random_port(f"tcp://{tcp_host}")
        ipc = f"ipc://@distrib-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.router.bind(ipc)
        store = ctx.store
        store.set(f"zmq/ep/{self.rank}", msgpack.packb([f"tcp://{tcp_host}:{port}", ipc]))
        self.dealers: dict[int, zmq.Socket] = {}
        self._monitors: dict[Any, int] = {}
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        # Work issued while a receive or a send's verdict waits ends the wait's poll.
        self._wake_fd = ctx.wake_fd
        if self._wake_fd is not None:
            self.poller.register(self._wake_fd, zmq.POLLIN)
        for peer in range(self.size):
            if peer == self.rank:
                continue
            tcp_ep, ipc_ep = msgpack.unpackb(store.get(f"zmq/ep/{peer}"), raw=False)
            dealer = self._zctx.socket(zmq.DEALER)
            self._tune(dealer)
            dealer.setsockopt(zmq.IDENTITY, b"r%d" % self.rank)
            # Flush what is queued when closing normally, but never block exit for long.
            dealer.setsockopt(zmq.LINGER, 2000)
            monitor = dealer.get_monitor_socket(
                zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
            )
            dealer.connect(ipc_ep if ctx.host_ids[peer] == me else tcp_ep)
            self.dealers[peer] = dealer
            self._monitors[monitor] = peer
            self.poller.register(monitor, zmq.POLLIN)

    @staticmethod
    def _tune(sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        # Unbounded queues: an op's sends are all queued before its receives (no
        # deadlock); memory is bounded by the op's own data (zero-copy frames).
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDBUF, 4 << 20)
        sock.setsockopt(zmq.RCVBUF, 4 << 20)

    def gname(self, peer: int) -> str:
        """``rank G`` (global rank) of a group rank, for messages."""
        return f"rank {self.global_ranks[peer]}"

    # -- sending -------------------------------------------------------------

    def send(
        self, peer: int, kind: int, seq: int, desc: bytes, payload: Any, copy: bool = False
    ) -> None:
        """Queue one message; large payloads go zero-copy and are tracked unless ``copy``
        (the caller overwrites ``payload`` before the op ends)."""
        sock = self.dealers[peer]
        header = _HEADER.pack(kind, seq, len(desc))
        if payload.nbytes < ZERO_COPY_MIN:
            # One frame: a multipart message costs a second trip through zmq per message.
            sock.send(b"".join((header, desc, payload)), copy=True)
            return
        sock.send(header + desc, zmq.SNDMORE)
        if not copy:
            self._trackers.append((peer, sock.send(payload, copy=False, track=True)))
        else:
            sock.send(payload, copy=True)

    def flush(self, op: str, deadline: float) -> None:
        """Wait until zmq no longer reads any buffer we sent zero-copy."""
        trackers, self._trackers = self._trackers, []
        for peer, tracker in trackers:
            while not tracker.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DistTimeoutError(
                        f"{op}: {self.gname(self.rank)} could not hand its data to the network "
                        "before the timeout; a peer stopped reading",
                        rank=self.global_ranks[self.rank],
                        op=op,
                    )
                try:
                    tracker.wait(min(remaining, 0.05))
                except zmq.NotDone:
                    # The peer we send to may be gone; a failure report may be waiting.
                    self._drain(op)
                    self._poll_failures(op, peer, time.monotonic())

    # -- receiving -----------------------------------------------------------

    def _take(self, peer: int, kind: int, seq: int) -> tuple[bytes, Any] | None:
        """First stashed message from ``peer`` that matches, else ``None``."""
        queue = self._stash[peer]
        for i, (k, s, desc, frame) in enumerate(queue):
            if k != kind:
                continue
            if kind == COLLECTIVE:
                if s < seq:
                    # Every message of a healthy group is consumed in its own op: one left
                    # over means the peer's op #s differed from ours.
                    del queue[i]
                    raise self._mismatch(peer, s, "stale")
                if s > seq:
                    return desc, None  # the peer moved on: reported as a mismatch
            elif s != seq:
                continue
            del queue[i]
            return desc, frame
        return None

    def recv(self, peer: int, kind: int, seq: int, op: str, deadline: float) -> Any:
        """The next matching message from ``peer`` (a zmq Frame)."""
        return self.recv_with_desc(peer, kind, seq, op, deadline)[1]

    def recv_with_desc(
        self, peer: int, kind: int, seq: int, op: str, deadline: float
    ) -> tuple[bytes, Any]:
        """The next matching message from ``peer``: (its descriptor bytes, its payload)."""
        found = self._take(peer, kind, seq)
        while found is None:
            self._pump(peer, op, deadline, seq if kind == COLLECTIVE else None)
            found = self._take(peer, kind, seq)
        if kind == COLLECTIVE and found[1] is None:
            raise self._mismatch(peer, seq, "later")
        return found

    def await_message(
        self, peer: int, kind: int, seq: int, op: str, deadline: float, give_way: Callable[[], bool]
    ) -> bool:
        """Wait until a message from ``peer`` of ``kind`` with ``seq`` (a P2P tag) is
        stashed, without taking it (True); False as soon as ``give_way()`` is true."""
        while not self.has_message(peer, kind, seq):
            if not self._pump(peer, op, deadline, None, give_way):
                return False
        return True

    def has_message(self, peer: int, kind: int, seq: int) -> bool:
        """Whether a message from ``peer`` of ``kind`` with ``seq`` is stashed (reads
        nothing: safe to ask from inside another wait's ``give_way``)."""
        return any(k == kind and s == seq for k, s, _, _ in self._stash[peer])

    def has_ack(self, peer: int, tag: int, n: int) -> bool:
        """Whether the verdict on our ``n``-th P2P message to ``peer`` with ``tag`` is here."""
        return (peer, tag, n) in self._acks or n <= self._acked_upto.get((peer, tag), 0)

    def take_ack(
        self,
        peer: int,
        tag: int,
        n: int,
        op: str,
        deadline: float,
        give_way: Callable[[], bool] | None = None,
    ) -> bytes | None:
        """The receiver's verdict on our ``n``-th P2P message to ``peer`` with ``tag``;
        ``None`` if ``give_way()`` turned true first (checked every few milliseconds)."""
        key = (peer, tag, n)
        while key not in self._acks:
            if n <= self._acked_upto.get((peer, tag), 0):
                return b""  # a positive ack, dropped to bound memory
            if not self._pump(peer, op, deadline, None, give_way):
                return None
        return self._acks.pop(key)

    def _mismatch(self, peer: int, seq: int, how: str) -> Exception:
        # The ranks agreed on the call before moving data, so this is a protocol slip
        # (say, a message size the descriptor does not decide): name it as such.
        when = {
            "later": "finished op #{seq} without sending to this rank",
            "stale": "sent data this rank's op #{seq} never used",
        }[how].format(seq=seq)
        return DistMismatchError(
            f"collective: mismatched collectives at op #{seq}: {self.gname(peer)} {when} "
            f"({self.gname(self.rank)}); every rank of the group must call the same "
            "collectives in the same order with matching arguments",
            rank=self.global_ranks[self.rank],
            op="collective",
            peer=self.global_ranks[peer],
        )

    def _drain(self, op: str) -> None:
        """Read what already arrived (without waiting), so an ABORT is seen."""
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                raise self._closed_error(op, exc) from None
            self._file(frames, op)

    def _pump(
        self,
        peer: int,
        op: str,
        deadline: float,
        seq: int | None,
        give_way: Callable[[], bool] | None = None,
    ) -> bool:
        """Receive whatever arrives next (stashing it), or fail if ``peer`` cannot deliver;
        False (nothing received) as soon as ``give_way()`` is true."""
        router = self.router
        try:
            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            frames = None
        except zmq.ZMQError as exc:
            raise self._closed_error(op, exc) from None
        started = time.monotonic()
        while frames is None:
            now = time.monotonic()
            # Short waits are normal: they skip the checks. A wait that may give way
            # starts over after each step aside, so it always checks (rate-limited).
            if give_way is not None or now - started >= _QUIET_WAIT_S:
                self._poll_failures(op, peer, now)
            if now >= deadline:
                raise self._timeout_error(peer, op, seq)
            if give_way is not None and give_way():
                return False
            wait_ms = max(1, min(_POLL_SLICE_MS, int((deadline - now) * 1000) + 1))
            try:
                events = dict(self.poller.poll(wait_ms))
            except zmq.ZMQError as exc:
                raise self._closed_error(op, exc) from None
            for sock in events:
                if sock == self._wake_fd:
                    _drain_fd(sock)  # new work: give_way() is asked again above
                elif sock is not router:
                    self._read_monitor(sock)
            if router in events:
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    frames = None
        self._file(frames, op)
        return True

    def _file(self, frames: list[Any], op: str) -> None:
        """Stash one received message (acks and aborts are handled at once)."""
        if len(frames) not in (2, 3):
            return  # not ours (a stray connection); ignore
        src = _rank_of(frames[0].bytes, self.size)
        whole = frames[1].buffer
        if src is None or len(whole) < _HEADER.size:
            return
        kind, seq, desc_len = _HEADER.unpack_from(whole)
        end = _HEADER.size + desc_len
        desc = bytes(whole[_HEADER.size : end])
        # Two frames: header and payload in one (small); three: payload separate (large).
        payload = whole[end:] if len(frames) == 2 else frames[2].buffer
        if kind == ABORT:
            raise self._aborted_by(src, bytes(payload), op)
        if kind == P2P_ACK:
            if len(self._acks) >= _MAX_ACKS:  # unclaimed positive acks: keep a watermark
                for peer, tag, n in [k for k, v in self._acks.items() if not v]:
                    del self._acks[(peer, tag, n)]
                    if n > self._acked_upto.get((peer, tag), 0):
                        self._acked_upto[(peer, tag)] = n
            self._acks[(src, seq, int.from_bytes(desc, "little"))] = bytes(payload)
            return
        self._stash[src].append((kind, seq, desc, payload))

    def _aborted_by(self, src: int, payload: bytes, op: str) -> DistError:
        """The error a rank raises when peer ``src`` reports that it failed."""
        try:
            info = msgpack.unpackb(payload, raw=False)
            culprit, cls_name, why = int(info[0]), str(info[1]), str(info[2])[:2000]
        except Exception:
            culprit, cls_name, why = self.global_ranks[src], "", "no reason given"
        cls = _ABORT_CLASSES.get(cls_name, DistPeerLostError)
        me, sender = self.global_ranks[self.rank], self.global_ranks[src]
        if culprit == sender:
            head = f"rank {sender} failed"
        else:
            head = f"rank {culprit} failed (reported by rank {sender})"
        return cls(
            f"{op}: rank {me} stopped: {head}: {why}",
            rank=me,
            op=op,
            peer=culprit,
            caused_by=culprit,
        )

    def send_abort(self, culprit: int, cls_name: str, reason: str) -> None:
        """Tell every peer this rank failed (best effort, never blocks)."""
        if self._closed:
            return
        body = np.frombuffer(msgpack.packb([culprit, cls_name, reason[:2000]]), np.uint8)
        for peer in self.dealers:
            try:
                self.send(peer, ABORT, 0, b"", body)
            except zmq.ZMQError:
                pass

    def _timeout_error(self, peer: int, op: str, seq: int | None) -> DistTimeoutError:
        chain = self._diagnose_timeout(peer, seq) if seq is not None else [peer]
        culprit = chain[-1]
        via = ""
        if len(chain) > 1:
            via = (
                " ("
                + ", ".join(
                    f"{self.gname(chain[i])} was waiting for {self.gname(chain[i + 1])}"
                    for i in range(len(chain) - 1)
                )
                + ")"
            )
        return DistTimeoutError(
            f"{op}: {self.gname(self.rank)} (group rank {self.rank} of {self.size}) timed out "
            f"waiting for {self.gname(peer)}{via}; {self.gname(culprit)} is hung, dead or not "
            f"{'calling this collective' if seq is not None else 'making the matching call'} "
            "(raise the timeout with the timeout argument of "
            "init_process_group/new_group or DISTRIB_TIMEOUT)",
            rank=self.global_ranks[self.rank],
            op=op,
            peer=self.global_ranks[culprit],
        )

    def _read_monitors(self) -> None:
        for monitor in self._monitors:
            self._read_monitor(monitor)

    def _read_monitor(self, monitor: zmq.Socket) -> None:
        peer = self._monitors[monitor]
        while True:
            try:
                msg = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(msg)["event"]
            if event == zmq.EVENT_CONNECTED:
                self._connected.add(peer)
                self._lost_since.pop(peer, None)
            else:
                # Disconnected, or a refused reconnect: peers bind before publishing their
                # endpoints, so a refusal means the peer's sockets are gone.
                self._lost_since.setdefault(peer, time.monotonic())

    def _poll_failures(self, op: str, peer: int | None, now: float) -> None:
        lost = self._lost_since.get(peer) if peer is not None else None
        if peer is not None and lost is None:
            self._read_monitors()
            lost = self._lost_since.get(peer)
        if peer is not None and lost is not None and now - lost > DISCONNECT_GRACE_S:
            self._drain(op)  # its last words (an ABORT naming someone else) come first
            raise DistPeerLostError(
                f"{op}: {self.gname(peer)} closed its connection or died while "
                f"{self.gname(self.rank)} was waiting for it",
                rank=self.global_ranks[self.rank],
                op=op,
                peer=self.global_ranks[peer],
            )
        if now >= self._next_failure_poll:
            self._next_failure_poll = now + FAILURE_POLL_S
            self._check_failed()

    def _closed_error(self, op: str, exc: Exception) -> DistClosedError:
        return DistClosedError(
            f"{op}: the sockets of {self.gname(self.rank)} were closed ({exc})",
            rank=self.global_ranks[self.rank],
            op=op,
        )

    def close(self) -> None:
        """Close every socket (DEALERs linger briefly to flush); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stash.clear()
        self._trackers.clear()
        self._acks.clear()
        for dealer in self.dealers.values():
            try:
                dealer.disable_monitor()
            except zmq.ZMQError:
                pass
        for monitor in list(self._monitors):
            monitor.close(0)
        for dealer in self.dealers.values():
            dealer.close()
        self.router.close(0)


def _rank_of(ident: bytes, size: int) -> int | None:
    if not ident.startswith(b"r"):
        return None
    try:
        r = int(ident[1:])
    except ValueError:
        return None
    return r if 0 <= r < size else None


def frame_array(payload: Any, dtype: np.dtype) -> np.ndarray:
    """A read-only numpy view of a received payload (a memoryview of zmq's frame, no copy)."""
    return np.frombuffer(payload, dtype=dtype)


def _drain_fd(fd: int) -> None:
    """Read a non-blocking pipe empty."""
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass
