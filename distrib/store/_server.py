"""The TCPStore server: a key-value map served from one background thread.

One ``selectors`` loop owns the listening socket and every connection (see
``_store_wire`` for the frames and the handshake). Every request gets exactly
one reply, possibly later: ``get`` and ``wait`` on missing keys are parked until
the keys appear or their own timeout passes. Nothing a client sends can stop
the thread: a malformed or unauthenticated request gets an error reply, a
frame too large or a forged tag closes that connection, and every limit
(value size, total bytes, keys, connections, parked waits) answers with an
error naming it. At the descriptor limit ``accept`` backs off instead of spinning.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .._errors import DistStoreError
from . import _commands as commands
from . import _wire as wire

__all__ = ["StoreServer"]

_IDLE_S = 0.5  # select timeout when nothing is parked
_ACCEPT_BACKOFF_S = 0.1  # pause accepting this long after EMFILE/ENFILE
_MAX_OUTBUF = 8 << 20  # stop reading a connection whose replies it does not read
_HANDSHAKE_S = 10.0  # a connection must finish its handshake within this


@dataclass
class _Conn:
    sock: socket.socket
    nonce: bytes
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    key: bytes | None = None  # session key once authenticated
    ready: bool = False  # handshake done
    next_seq: int = 1
    parked: int = 0
    closing: bool = False  # close once outbuf is flushed
    mask: int = 0  # the selector events registered now
    opened: float = field(default_factory=time.monotonic)


class StoreServer:
    """Serve a key-value map on ``host:port`` (port 0: a free port, see ``port``).

    ``secret`` (settable until ``start``) makes every connection authenticate.
    """

    def __init__(
        self, host: str, port: int, secret: bytes | None, limits: wire.Limits | None = None
    ) -> None:
        self.secret = secret
        self.limits = limits or wire.Limits()
        self._map = commands.KeyValueMap(self.limits)
        self._conns: dict[int, _Conn] = {}
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._accept_paused_until = 0.0
        self._next_reap = 0.0
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host.strip("[]"), port))
        except OSError as exc:
            self._listener.close()
            raise DistStoreError(
                f"TCPStore: cannot bind {host}:{port}: {exc.strerror}; pick another port or "
                "pass port=0",
                op="store.bind",
                peer=f"{host}:{port}",
            ) from None
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._spare: int | None = _open_spare()
        self._thread = threading.Thread(target=self._serve, name="distrib-store", daemon=True)
        self.stats = {"errors": 0, "closed": 0, "accept_backoffs": 0}

    def start(self) -> None:
        """Listen and serve from the background thread."""
        try:
            self._listener.listen(1024)
        except OSError as exc:
            # Two servers can both bind one port (SO_REUSEADDR) until one listens: the
            # other learns here, and says so as a bind failure does.
            host, port = self._listener.getsockname()[:2]
            self.close()
            raise DistStoreError(
                f"TCPStore: cannot listen on {host}:{port}: {exc.strerror}; pick another port "
                "or pass port=0",
                op="store.bind",
                peer=f"{host}:{port}",
            ) from None
        self._listener.setblocking(False)
        self._wake_r.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread.start()

    def alive(self) -> bool:
        """Whether the serving thread runs (it only stops on ``close``)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop serving, close every connection; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        # The listener first: a client that sees its connection close (a rank waiting
        # in ``leave`` for this store to go) must find the port closed, not a new
        # connection accepted into the backlog of a store about to vanish.
        self._listener.close()
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        for s in (self._wake_r, self._wake_w):
            s.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        self._sel.close()

    # -- the loop ------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # a bug must not end the store: count it, keep serving
                self.stats["errors"] += 1
                time.sleep(0.01)

    def _step(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._sel.register(self._listener, selectors.EVENT_READ, None)
        timeout = self._map.next_timeout(_IDLE_S)
        if self._accept_paused_until:
            timeout = min(timeout, max(0.0, self._accept_paused_until - now))
        for key, mask in self._sel.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                try:
                    self._wake_r.recv(64)
                except OSError:
                    pass
            else:
                conn = self._conns.get(key.fd)
                if conn is None:
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        self._read(conn)
                    if mask & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                        self._flush(conn)
                except Exception:
                    self.stats["errors"] += 1
                    self._drop(conn)
        if self._map.parked:
            for conn_fd, seq, status, value in self._map.expire(time.monotonic()):
                self._answer(conn_fd, seq, status, value)
        self._reap_slow_handshakes()

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._out_of_descriptors()
                return
            if len(self._conns) >= self.limits.max_connections:
                _refuse(
                    sock,
                    f"the store has reached its limit of {self.limits.max_connections} "
                    "connections (max_connections)",
                )
                continue
            self._open(sock)

    def _out_of_descriptors(self) -> None:
        """Refuse one waiting client through the spare descriptor, then pause accepting."""
        self.stats["accept_backoffs"] += 1
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            try:
                sock, _ = self._listener.accept()
                _refuse(sock, "the store's host has run out of file descriptors")
            except OSError:
                pass
            self._spare = _open_spare()
        if not self._accept_paused_until:
            self._sel.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + _ACCEPT_BACKOFF_S

    def _open(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, os.urandom(wire.NONCE_BYTES))
        self._conns[sock.fileno()] = conn
        hello = [
            wire.MAGIC,
            wire.VERSION,
            conn.nonce,
            self.secret is not None,
            wire.limits_doc(self.limits),
        ]
        conn.outbuf += wire.frame(hello, None, b"")
        conn.mask = selectors.EVENT_READ | selectors.EVENT_WRITE
        self._sel.register(sock, conn.mask, None)
        self._flush(conn)

    def _reap_slow_handshakes(self) -> None:
        now = time.monotonic()
        if now < self._next_reap:
            return
        self._next_reap = now + 1.0
        for conn in [c for c in self._conns.values() if not c.ready]:
            if now - conn.opened > _HANDSHAKE_S:
                self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self._conns.pop(fd, None)
            self._map.forget_connection(fd)
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()
        self.stats["closed"] += 1

    # -- bytes in, bytes out ---------------------------------------------------

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        if conn.closing:
            return  # discard what follows a fatal error
        conn.inbuf += data
        self._process(conn)
        self._flush(conn)

    def _process(self, conn: _Conn) -> None:
        """Handle the complete frames received, while the client reads its replies."""
        limit = self.limits.max_frame_bytes if conn.ready else wire.MAX_HANDSHAKE_BYTES
        while len(conn.inbuf) >= wire.HEADER.size and not conn.closing:
            if len(conn.outbuf) > _MAX_OUTBUF:
                return  # resumed by _flush once the client has read enough
            (length,) = wire.HEADER.unpack_from(conn.inbuf)
            if length > limit + wire.TAG_BYTES:
                self._fatal(
                    conn,
                    wire.Status.LIMIT,
                    f"a frame of {length} bytes exceeds the store's limit of {limit} bytes "
                    "(values are limited to max_value_bytes)",
                )
                return
            end = wire.HEADER.size + length
            if len(conn.inbuf) < end:
                return
            payload = bytes(conn.inbuf[wire.HEADER.size : end])
            del conn.inbuf[:end]
            if conn.ready:
                self._request(conn, payload)
            else:
                self._handshake(conn, payload)
            limit = self.limits.max_frame_bytes if conn.ready else wire.MAX_HANDSHAKE_BYTES

    def _flush(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return  # already dropped
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(conn)
                return
            if len(conn.outbuf) <= _MAX_OUTBUF and conn.inbuf and not conn.closing:
                self._process(conn)  # requests held back while the client was not reading
        if conn.closing and not conn.outbuf:
            self._drop(conn)
            return
        # Do not read from a client that does not read its replies (bounded memory, no spin).
        want = (selectors.EVENT_READ if len(conn.outbuf) <= _MAX_OUTBUF else 0) | (
            selectors.EVENT_WRITE if conn.outbuf else 0
        )
        if want != conn.mask:
            conn.mask = want
            try:
                self._sel.modify(conn.sock, want, None)
            except (KeyError, ValueError):
                pass

    def _send(self, conn: _Conn, obj: Any) -> None:
        conn.outbuf += wire.frame(obj, conn.key, b"r")

    def _fatal(self, conn: _Conn, status: wire.Status, message: str) -> None:
        """Reply with an error (seq 0: not an answer to any request) and close: after a
        frame that cannot be parsed, nothing that follows on the connection can be trusted."""
        self._send(conn, [0, int(status), message])
        conn.closing = True
        conn.inbuf.clear()
        self._flush(conn)

    # -- handshake and requests ------------------------------------------------

    def _handshake(self, conn: _Conn, payload: bytes) -> None:
        try:
            msg = wire.unpack(payload)
            if not (isinstance(msg, list) and len(msg) == 2):
                raise ValueError("handshake is not [nonce, proof]")
            client_nonce, proof = msg
            if not (isinstance(client_nonce, bytes) and len(client_nonce) == wire.NONCE_BYTES):
                raise ValueError("client nonce is not 16 bytes")
            if not isinstance(proof, bytes):
                raise ValueError("proof is not bytes")
        except ValueError as exc:
            self._fatal(conn, wire.Status.ERROR, f"malformed handshake: {exc}")
            return
        if self.secret is None:
            conn.ready = True
            self._send(conn, [int(wire.Status.OK), b"", ""])
            return
        expected = wire.derive(self.secret, b"client", conn.nonce, client_nonce)
        if not wire.hmac.compare_digest(proof, expected):
            self._fatal(
                conn,
                wire.Status.AUTH,
                "authentication failed: this store requires the job's shared secret "
                "(auth_token argument or DISTRIB_AUTH_TOKEN)",
            )
            return
        reply = [
            int(wire.Status.OK),
            wire.derive(self.secret, b"server", conn.nonce, client_nonce),
            "",
        ]
        self._send(conn, reply)  # still untagged: the client checks the proof instead
        conn.key = wire.derive(self.secret, b"session", conn.nonce, client_nonce)
        conn.ready = True

    def _request(self, conn: _Conn, payload: bytes) -> None:
        try:
            msg = wire.open_frame(payload, conn.key, b"q")
        except PermissionError as exc:
            self._fatal(conn, wire.Status.AUTH, f"request refused: {exc}")
            return
        except ValueError as exc:
            self._fatal(conn, wire.Status.ERROR, f"malformed request: {exc}")
            return
        if not (isinstance(msg, list) and len(msg) == 3):
            self._fatal(conn, wire.Status.ERROR, "malformed request: not [seq, command, args]")
            return
        seq, command, args = msg
        if not isinstance(seq, int) or isinstance(seq, bool) or seq != conn.next_seq:
            if conn.key is not None:
                self._fatal(
                    conn,
                    wire.Status.AUTH,
                    f"request refused: sequence number {seq!r} is not the expected "
                    f"{conn.next_seq} (a replayed or reordered request)",
                )
                return
            self._fatal(conn, wire.Status.ERROR, f"malformed request: sequence number {seq!r}")
            return
        conn.next_seq += 1
        fd = conn.sock.fileno()
        try:
            result = self._map.execute(fd, seq, command, args, conn.parked)
        except commands.RequestError as exc:
            self._send(conn, [seq, int(exc.status), str(exc)])
            return
        except Exception as exc:  # defensive: never let one request end the thread
            self.stats["errors"] += 1
            self._send(conn, [seq, int(wire.Status.ERROR), f"internal error: {type(exc).__name__}"])
            return
        if result.parked:
            conn.parked += 1
        else:
            self._send(conn, [seq, int(wire.Status.OK), result.value])
        for waiter in result.woken:
            self._answer(waiter.conn_fd, waiter.seq, wire.Status.OK, waiter.value)

    def _answer(self, conn_fd: int, seq: int, status: wire.Status, value: Any) -> None:
        """Reply to a request that was parked (its connection may be gone)."""
        conn = self._conns.get(conn_fd)
        if conn is None:
            return
        conn.parked = max(0, conn.parked - 1)
        self._send(conn, [seq, int(status), value])
        if conn.sock.fileno() >= 0:
            self._flush(conn)


def _refuse(sock: socket.socket, message: str) -> None:
    """Tell a client why it is not served (best effort, never blocks) and close."""
    try:
        sock.setblocking(False)
        sock.send(wire.frame([wire.MAGIC, wire.VERSION, b"", False, message], None, b""))
    except OSError:
        pass
    sock.close()


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None
