"""A full mesh of TCP connections on 127.0.0.1 among the ranks that share one GPU.

It carries only small control messages (IPC handles, sequence numbers, acks);
the data never leaves the device. Wire format: a 4-byte little-endian length,
then a msgpack map. Setup: every rank binds port 0, publishes its port and a
random nonce in the group's store, connects to each lower rank (presenting that
rank's nonce, so a stray connection to the port is refused) and accepts each
higher rank. Messages from one peer arrive in order; a reader that wants a
particular kind parks the others in that peer's inbox.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack

from ..._errors import DistPeerLostError, DistTimeoutError

__all__ = ["GpuMesh"]

_LEN = struct.Struct("<I")
_MAX_FRAME = 1 << 20  # control messages are a few hundred bytes; anything larger is garbage


class GpuMesh:
    """Ordered, deadline-bounded control messages between every pair of ranks."""

    def __init__(
        self,
        store: Any,
        rank: int,
        size: int,
        deadline: float,
        key: str,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.rank = rank
        self.check = check  # raises an error another rank published (called while blocked)
        self.size = size
        self.socks: dict[int, socket.socket] = {}
        self.inbox: dict[int, list[dict[str, Any]]] = {p: [] for p in range(size) if p != rank}
        self.aborted: str | None = None
        nonce = os.urandom(16).hex()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(max(1, size))
            port = listener.getsockname()[1]
            store.set(f"{key}/addr/{rank}", msgpack.packb([port, nonce]))
            for peer in range(rank):
                peer_port, peer_nonce = msgpack.unpackb(store.get(f"{key}/addr/{peer}"))
                sock = socket.create_connection(
                    ("127.0.0.1", peer_port), timeout=self._remaining(deadline, "connect", peer)
                )
                self._setup(sock)
                self.socks[peer] = sock
                self.send(peer, {"k": "hello", "rank": rank, "nonce": peer_nonce})
            while len(self.socks) < size - 1:
                listener.settimeout(self._remaining(deadline, "accept", None))
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    raise self._timeout("accept", None, deadline) from None
                self._setup(sock)
                hello = self._read_frame(sock, None, deadline, "accept")
                peer = hello.get("rank")
                if hello.get("k") != "hello" or hello.get("nonce") != nonce or peer in self.socks:
                    sock.close()  # not one of ours
                    continue
                self.socks[peer] = sock
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    @staticmethod
    def _setup(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _remaining(self, deadline: float, op: str, peer: int | None) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timeout(op, peer, deadline)
        return left

    def _timeout(self, op: str, peer: int | None, deadline: float) -> DistTimeoutError:
        who = f"rank {peer}" if peer is not None else "the other ranks sharing this GPU"
        return DistTimeoutError(
            f"rank {self.rank}/{self.size}: {op} timed out waiting for {who} (GPU control "
            "channel); raise the group timeout (init_process_group(timeout=...) or "
            "DISTRIB_TIMEOUT) if the peer is just slow",
            rank=self.rank,
            op=op,
            peer=peer,
        )

    def _lost(self, op: str, peer: int | None, why: str) -> DistPeerLostError:
        return DistPeerLostError(
            f"rank {self.rank}/{self.size}: {op} failed: {why}", rank=self.rank, op=op, peer=peer
        )

    def send(self, peer: int, msg: dict[str, Any]) -> None:
        """Send one control message to ``peer``."""
        if self.aborted is not None:
            raise self._lost(msg.get("k", "send"), peer, self.aborted)
        data = msgpack.packb(msg, use_bin_type=True)
        try:
            self.socks[peer].sendall(_LEN.pack(len(data)) + data)
        except OSError as exc:
            raise self._lost(str(msg.get("k")), peer, f"connection to rank {peer} broke ({exc})")

    def _read_exact(
        self, sock: socket.socket, n: int, peer: Any, deadline: float, op: str
    ) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self.aborted is not None:
                raise self._lost(op, peer, self.aborted)
            sock.settimeout(min(self._remaining(deadline, op, peer), 0.5))
            try:
                chunk = sock.recv(n - len(buf))
            except TimeoutError:
                if self.check is not None:
                    self.check()
                continue  # re-check abort and the deadline
            except OSError as exc:
                raise self._lost(op, peer, f"connection to rank {peer} broke ({exc})")
            if not chunk:
                raise self._lost(op, peer, f"rank {peer} closed its connection (did it exit?)")
            buf += chunk
        return bytes(buf)

    def _read_frame(self, sock: socket.socket, peer: Any, deadline: float, op: str) -> Any:
        (n,) = _LEN.unpack(self._read_exact(sock, _LEN.size, peer, deadline, op))
        if n > _MAX_FRAME:
            raise self._lost(op, peer, f"rank {peer} sent a {n}-byte control frame (corrupt)")
        return msgpack.unpackb(self._read_exact(sock, n, peer, deadline, op), raw=False)

    def recv_match(
        self,
        peer: int,
        match: Callable[[dict[str, Any]], bool],
        deadline: float,
        op: str,
        on_other: Callable[[int, dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """Return the first message from ``peer`` that ``match``es; park the others.

        ``on_other`` may consume a non-matching message (return True) instead of
        parking it (used for asynchronous acknowledgements).
        """
        box = self.inbox[peer]
        for i, msg in enumerate(box):
            if match(msg):
                return box.pop(i)
        while True:
            msg = self._read_frame(self.socks[peer], peer, deadline, op)
            if match(msg):
                return msg
            if on_other is None or not on_other(peer, msg):
                box.append(msg)

    def poll(self, on_msg: Callable[[int, dict[str, Any]], bool]) -> None:
        """Read whatever has already arrived, without blocking; ``on_msg`` may consume it."""
        import select

        while self.socks and self.aborted is None:
            ready, _, _ = select.select(list(self.socks.values()), [], [], 0)
            if not ready:
                return
            for sock in ready:
                peer = next(p for p, s in self.socks.items() if s is sock)
                msg = self._read_frame(sock, peer, time.monotonic() + 5.0, "poll")
                if not on_msg(peer, msg):
                    self.inbox[peer].append(msg)

    def abort(self, reason: str) -> None:
        """Make blocked and later calls fail with ``DistPeerLostError(reason)``."""
        self.aborted = reason
        for sock in self.socks.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
