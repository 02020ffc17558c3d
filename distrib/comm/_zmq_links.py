"""ZeroMQ links among the ranks of one group: framing, matching, failure detection.

Wiring: each rank binds one ROUTER socket (TCP on ``bind_host``, plus an
abstract-namespace IPC endpoint for peers on the same machine) and publishes
its endpoints in the group's store; then it connects one DEALER per peer
(identity ``r<rank>``), IPC when the peer's host id equals its own. Rank ``a``
sends to ``b`` on its DEALER; ``b`` reads everything on its ROUTER. One TCP/IPC
connection per ordered pair keeps each sender's messages in order.

Message = ``[header, payload]``; header = ``<kind:u8, seq:i64>`` + descriptor.
``kind`` is COLLECTIVE (``seq`` = the group's op counter, descriptor = the
call's msgpack descriptor, compared with ours: mismatch detection for free) or
P2P (``seq`` = user tag, descriptor = dtype/size). A message from another peer
or for a later op is stashed per peer until asked for; older ones are stale.

Failure detection while blocked: a monitor on each DEALER reports a peer's
disconnect (killed, closed its sockets), confirmed after a short grace so data
already sent still arrives; every ``FAILURE_POLL_S`` the group's store is asked
whether another rank published a failure; the deadline bounds everything.
Zero-copy sends (large segments) are tracked and awaited before an op returns,
so a caller may reuse its buffer immediately.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections import deque
from typing import Any

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from .._errors import DistClosedError, DistMismatchError, DistPeerLostError, DistTimeoutError
from ._engine import EngineContext

__all__ = ["COLLECTIVE", "P2P", "ZmqLinks", "describe"]

COLLECTIVE = 0
P2P = 1
_HEADER = struct.Struct("<BqI")  # kind, seq (or tag), descriptor length
# Below this many bytes a send copies (pyzmq's own copy threshold): tracking costs more.
ZERO_COPY_MIN = 65536
# A disconnected peer is declared lost after this long without its data (lets in-flight
# messages on its other connection drain when it exits normally).
DISCONNECT_GRACE_S = 0.5
FAILURE_POLL_S = 0.2  # how often a blocked rank asks the store about failures elsewhere
_POLL_SLICE_MS = 50
_QUIET_WAIT_S = 0.02  # waits shorter than this never consult the store or the monitors


def describe(desc: bytes) -> str:
    """Human-readable form of a call descriptor (``all_reduce(shape=(3,), ...)``)."""
    try:
        d = msgpack.unpackb(desc, raw=False)
        name = d.pop("op")
        return f"{name}(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"
    except Exception:
        return repr(desc)


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
        self._trackers: list[Any] = []
        self._lost_since: dict[int, float] = {}
        self._connected: set[int] = set()
        self._next_failure_poll = 0.0
        self._recent_descs: dict[int, bytes] = {}  # seq -> our descriptor, for stale messages
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
            self._trackers.append(sock.send(payload, copy=False, track=True))
        else:
            sock.send(payload, copy=True)

    def flush(self, op: str, deadline: float) -> None:
        """Wait until zmq no longer reads any buffer we sent zero-copy."""
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
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
                    tracker.wait(min(remaining, 0.1))
                except zmq.NotDone:
                    self._poll_failures(op, None, time.monotonic())

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
                    # over means the peer's op #s differed from ours (say, another root).
                    del queue[i]
                    raise self._mismatch(peer, s, self._recent_descs.get(s, b""), desc, "stale")
                if s > seq:
                    return desc, None  # the peer moved on: reported as a mismatch
            elif s != seq:
                continue
            del queue[i]
            return desc, frame
        return None

    def recv(self, peer: int, kind: int, seq: int, desc: bytes, op: str, deadline: float) -> Any:
        """The next matching message from ``peer`` (a zmq Frame), checking its descriptor."""
        if kind == COLLECTIVE and seq not in self._recent_descs:
            self._recent_descs[seq] = desc
            self._recent_descs.pop(seq - 16, None)
        found = self._take(peer, kind, seq)
        while found is None:
            self._pump(peer, op, deadline, seq if kind == COLLECTIVE else None)
            found = self._take(peer, kind, seq)
        their_desc, frame = found
        if kind == COLLECTIVE and (frame is None or their_desc != desc):
            raise self._mismatch(
                peer, seq, desc, their_desc, "same" if frame is not None else "later"
            )
        return frame

    def _mismatch(self, peer: int, seq: int, mine: bytes, theirs: bytes, how: str) -> Exception:
        when = {
            "same": "as the same op",
            "later": "as its next op, having finished this one without sending to "
            f"{self.gname(self.rank)}",
            "stale": f"and sent {self.gname(self.rank)} data this rank's op #{seq} never used",
        }[how]
        name = msgpack.unpackb(mine, raw=False).get("op", "collective") if mine else "collective"
        return DistMismatchError(
            f"{name}: mismatched collectives at op #{seq}: {self.gname(self.rank)} called "
            f"{describe(mine)} but {self.gname(peer)} called {describe(theirs)} ({when}); every "
            "rank of the group must call the same collectives in the same order with matching "
            "arguments",
            rank=self.global_ranks[self.rank],
            op=name,
            peer=self.global_ranks[peer],
        )

    def _pump(self, peer: int, op: str, deadline: float, seq: int | None) -> None:
        """Receive whatever arrives next (stashing it), or fail if ``peer`` cannot deliver."""
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
            if now - started >= _QUIET_WAIT_S:  # short waits are normal: skip the store
                self._poll_failures(op, peer, now)
            if now >= deadline:
                raise self._timeout_error(peer, op, seq)
            wait_ms = max(1, min(_POLL_SLICE_MS, int((deadline - now) * 1000) + 1))
            try:
                events = dict(self.poller.poll(wait_ms))
            except zmq.ZMQError as exc:
                raise self._closed_error(op, exc) from None
            for sock in events:
                if sock is not router:
                    self._read_monitor(sock)
            if router in events:
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    frames = None
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
        self._stash[src].append((kind, seq, desc, payload))

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
            "calling this collective (raise the timeout with the timeout argument of "
            "init_process_group/new_group or DISTRIB_TIMEOUT)",
            rank=self.global_ranks[self.rank],
            op=op,
            peer=self.global_ranks[culprit],
        )

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
        if peer is not None and lost is not None and now - lost > DISCONNECT_GRACE_S:
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
