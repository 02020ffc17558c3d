"""``TCPStore``: the client of distrib's key-value store (torch's interface).

``TCPStore`` talks to a ``StoreServer`` (hosted by the master, or by
``distrib-run``, in a background thread) over one authenticated TCP connection
per client (see ``_store_wire``); requests carry a sequence number so a late
reply to a timed-out request is recognised and dropped. Every call is bounded
by the store's timeout; a connection the store's host closes is a
``DistPeerLostError`` at once. A client reconnects after ``fork`` and pickles
as a plain client (host, port, timeout, secret).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from .._config import config
from .._errors import (
    DistAuthError,
    DistClosedError,
    DistPeerLostError,
    DistStoreError,
    DistTimeoutError,
)
from . import _auth as _auth
from . import _wire as wire
from ._base import DEFAULT_STORE_TIMEOUT_S, Store, _as_bytes, _as_key, to_seconds
from ._server import StoreServer

__all__ = ["TCPStore"]


class TCPStore(Store):
    """Key-value store served over TCP by the master process; torch's ``TCPStore``.

    Args:
        host: address the master binds and clients connect to (never 0.0.0.0
            unless given explicitly).
        port: TCP port; 0 on the master binds a free one (read ``port`` after).
        world_size: number of processes that will connect (with
            ``wait_for_workers`` the master waits for all of them).
        is_master: serve the store from a background thread of this process.
        timeout: ``timedelta`` or seconds bounding every request (default
            ``DISTRIB_TIMEOUT`` or 300 s).
        auth_token: shared secret; both sides prove they hold it and every
            request is signed with a per-connection key. Default
            ``DISTRIB_AUTH_TOKEN``; on a loopback address, a private per-user
            file written by the master (see ``docs/reliability.md``).
        limits: the master's ``Limits`` (value size, total bytes, keys,
            connections, parked waits); clients learn them when they connect.
    """

    def __init__(
        self,
        host: str,
        port: int,
        world_size: int | None = None,
        is_master: bool = False,
        timeout: Any = None,
        wait_for_workers: bool = True,
        *,
        auth_token: str | bytes | None = None,
        limits: wire.Limits | None = None,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise TypeError(f"TCPStore: host must be a non-empty string, got {host!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
            raise ValueError(f"TCPStore: port must be an int in 0..65535, got {port!r}")
        if port == 0 and not is_master:
            raise ValueError("TCPStore: port=0 is only valid for the master (is_master=True)")
        if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
            raise ValueError(f"TCPStore: world_size must be a positive int, got {world_size!r}")
        cfg = config()
        if timeout is not None:
            self.timeout = to_seconds(timeout)
        elif cfg.timeout is not None:
            self.timeout = to_seconds(cfg.timeout, "DISTRIB_TIMEOUT")
        else:
            self.timeout = DEFAULT_STORE_TIMEOUT_S
        self._secret = _auth.explicit_secret(auth_token)
        self._strict = self._secret is not None  # refuse a store that does not authenticate
        self.host = host
        self.world_size = world_size
        self.is_master = is_master
        self.hosted_by: str | None = None  # e.g. "rank 0": named when the connection is lost
        self._server: StoreServer | None = None
        self._token_file: str | None = None
        if is_master:
            self._server = StoreServer(host, port, None, limits)
            port = self._server.port
            try:
                if self._secret is None and _auth.is_loopback(host):
                    self._secret, self._token_file = _auth.write_token_file(port)
                elif self._secret is None:
                    _auth.warn_unauthenticated(host, port)
            except BaseException:
                self._server.close()
                raise
            self._server.secret = self._secret
            try:
                self._server.start()
            except BaseException:
                if self._token_file is not None and self._secret is not None:
                    _auth.remove_token_file(self._token_file, self._secret)
                raise
        self.port = port
        self._reset_connection()
        self._closed = False
        if world_size is not None and wait_for_workers:
            self._join_and_wait(world_size)

    def _reset_connection(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._sock: socket.socket | None = None
        self._key: bytes | None = None
        self._seq = 0
        self._rbuf = bytearray()
        self._limits = wire.Limits()
        self._was_connected = False

    def __repr__(self) -> str:
        role = "master" if self.is_master else "client"
        return f"TCPStore({self.host}:{self.port}, {role})"

    @property
    def server(self) -> StoreServer | None:
        """The server this master hosts (``None`` on clients)."""
        return self._server

    # -- connection ---------------------------------------------------------

    def _where(self) -> str:
        where = f"{self.host}:{self.port}"
        return f"{where} (hosted by {self.hosted_by})" if self.hosted_by else where

    def _peer(self) -> Any:
        if self.hosted_by and self.hosted_by.startswith("rank "):
            return int(self.hosted_by.split()[1])
        return f"{self.host}:{self.port}"

    def _lost(self, op: str, detail: str) -> DistPeerLostError:
        self._drop()
        who = self.hosted_by or "the process hosting it"
        return DistPeerLostError(
            f"{op}: lost the connection to the store at {self._where()} ({detail}); "
            f"{who} has probably exited or crashed",
            op=op,
            peer=self._peer(),
        )

    def _drop(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close()
        self._sock, self._key, self._rbuf = None, None, bytearray()

    def _timed_out(self, op: str, budget: float) -> DistTimeoutError:
        return DistTimeoutError(
            f"{op}: no reply from the store at {self._where()} within {budget:.1f} s; is the "
            "master running and reachable? (timeout is set by the timeout argument or "
            "DISTRIB_TIMEOUT)",
            op=op,
            peer=self._peer(),
        )

    def _connection(self, deadline: float, op: str, budget: float) -> socket.socket:
        if self._closed:
            raise DistClosedError(f"{self!r} is closed", op="store")
        if self._pid != os.getpid():
            # After fork the parent's connection belongs to the parent: make our own.
            self._sock, self._key, self._rbuf = None, None, bytearray()
            self._pid, self._was_connected = os.getpid(), False
        if self._sock is not None:
            return self._sock
        delay = 0.005
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(op, budget)
            try:
                sock = socket.create_connection(
                    (self.host.strip("[]"), self.port), min(remaining, 5.0)
                )
                break
            except OSError as exc:
                if self._was_connected and isinstance(exc, ConnectionRefusedError):
                    raise self._lost(op, "connection refused") from None
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._rbuf = sock, bytearray()
        try:
            self._handshake(sock, deadline, op, budget)
        except BaseException:
            self._drop()
            raise
        self._was_connected = True
        return sock

    def _handshake(self, sock: socket.socket, deadline: float, op: str, budget: float) -> None:
        where = self._where()
        hello = wire.unpack(self._read_frame(deadline, op, budget, wire.MAX_HANDSHAKE_BYTES))
        if not (isinstance(hello, list) and len(hello) == 5 and hello[0] == wire.MAGIC):
            raise DistStoreError(
                f"{op}: {where} is not a distrib store (another program listens there?)",
                op=op,
                peer=self._peer(),
            )
        _, version, server_nonce, auth_required, limits = hello
        if server_nonce == b"" and isinstance(limits, str):
            raise DistStoreError(
                f"{op}: the store at {where} refused the connection: {limits}",
                op=op,
                peer=self._peer(),
            )
        if version != wire.VERSION or not isinstance(server_nonce, bytes):
            raise DistStoreError(
                f"{op}: the store at {where} speaks protocol {version!r}, this process "
                f"{wire.VERSION}; run the same distrib version everywhere",
                op=op,
                peer=self._peer(),
            )
        try:
            self._limits = wire.parse_limits(limits)
        except ValueError as exc:
            raise DistStoreError(
                f"{op}: bad hello from {where}: {exc}", op=op, peer=self._peer()
            ) from None
        secret = self._secret
        if auth_required and secret is None and _auth.is_loopback(self.host):
            secret = self._secret = _auth.read_token_file(self.port)
        if auth_required and secret is None:
            raise DistAuthError(
                f"{op}: the store at {where} refused the request: it requires the job's "
                "shared secret and this process has none (pass auth_token= or set "
                "DISTRIB_AUTH_TOKEN; distrib-run sets it for its workers)",
                op=op,
                peer=self._peer(),
            )
        if not auth_required:
            if self._strict:
                raise DistAuthError(
                    f"{op}: the store at {where} does not authenticate, but this process holds "
                    "a shared secret: its master was started without it; refusing to trust it",
                    op=op,
                    peer=self._peer(),
                )
            secret = None
            if not _auth.is_loopback(self.host):
                _auth.warn_unauthenticated(self.host, self.port)
        client_nonce = os.urandom(wire.NONCE_BYTES)
        proof = wire.derive(secret, b"client", server_nonce, client_nonce) if secret else b""
        self._send(wire.frame([client_nonce, proof], None, b""), deadline, op, budget)
        reply = wire.unpack(self._read_frame(deadline, op, budget, wire.MAX_HANDSHAKE_BYTES))
        if (
            isinstance(reply, list)
            and len(reply) == 3
            and reply[0] == 0
            and isinstance(reply[1], int)
            and isinstance(reply[2], str)
        ):
            # [0, status, message]: the server refused and closes the connection
            raise DistAuthError(
                f"{op}: the store at {where} refused the request: {reply[2]}",
                op=op,
                peer=self._peer(),
            )
        if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == wire.Status.OK):
            raise DistStoreError(
                f"{op}: bad handshake reply from {where}", op=op, peer=self._peer()
            )
        if secret is not None:
            good = wire.derive(secret, b"server", server_nonce, client_nonce)
            if not (isinstance(reply[1], bytes) and wire.hmac.compare_digest(reply[1], good)):
                raise DistAuthError(
                    f"{op}: the store at {where} could not prove it holds the shared secret",
                    op=op,
                    peer=self._peer(),
                )
            self._key = wire.derive(secret, b"session", server_nonce, client_nonce)
        self._seq = 0

    def _send(self, data: bytes, deadline: float, op: str, budget: float) -> None:
        assert self._sock is not None
        try:
            self._sock.settimeout(max(0.001, min(deadline - time.monotonic(), 3600.0)))
            self._sock.sendall(data)
        except TimeoutError:
            self._drop()
            raise self._timed_out(op, budget) from None
        except OSError as exc:
            raise self._lost(op, exc.strerror or type(exc).__name__) from None

    def _read_frame(self, deadline: float, op: str, budget: float, limit: int) -> bytes:
        """The next frame's payload; a closed connection is ``DistPeerLostError``."""
        buf = self._rbuf
        need = wire.HEADER.size
        while True:
            if len(buf) >= wire.HEADER.size:
                (length,) = wire.HEADER.unpack_from(buf)
                if length > limit + wire.TAG_BYTES:
                    self._drop()
                    raise DistStoreError(
                        f"{op}: the store at {self._where()} sent a frame of {length} bytes, "
                        f"over the limit of {limit}",
                        op=op,
                        peer=self._peer(),
                    )
                need = wire.HEADER.size + length
                if len(buf) >= need:
                    payload = bytes(buf[wire.HEADER.size : need])
                    del buf[:need]
                    return payload
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(op, budget)
            assert self._sock is not None
            try:
                self._sock.settimeout(min(remaining, 3600.0))
                data = self._sock.recv(max(65536, need - len(buf)))
            except TimeoutError:
                raise self._timed_out(op, budget) from None
            except OSError as exc:
                raise self._lost(op, exc.strerror or type(exc).__name__) from None
            if not data:
                raise self._lost(op, "connection closed")
            buf += data

    def _request(
        self,
        command: str,
        args: list[Any],
        wait_s: float | None = None,
        values: tuple[bytes, ...] = (),
    ) -> Any:
        """Send one request and wait for its reply (``wait_s``: server-side park time)."""
        op = f"store.{command}"
        budget = self.timeout if wait_s is None else wait_s
        # The server answers parked requests at their deadline; allow a margin for that.
        deadline = time.monotonic() + budget + (1.0 if wait_s is not None else 0.0)
        with self._lock:
            self._connection(deadline, op, budget)
            self._check_sizes(op, args, values)
            self._seq += 1
            seq = self._seq
            self._send(wire.frame([seq, command, args], self._key, b"q"), deadline, op, budget)
            while True:
                payload = self._read_frame(deadline, op, budget, self._limits.max_frame_bytes)
                try:
                    msg = wire.open_frame(payload, self._key, b"r")
                except PermissionError as exc:
                    self._drop()
                    raise DistAuthError(
                        f"{op}: a reply from {self._where()} failed authentication ({exc})",
                        op=op,
                        peer=self._peer(),
                    ) from None
                except ValueError as exc:
                    self._drop()
                    raise DistStoreError(
                        f"{op}: garbage from the store at {self._where()}: {exc}",
                        op=op,
                        peer=self._peer(),
                    ) from None
                if not (isinstance(msg, list) and len(msg) == 3 and isinstance(msg[0], int)):
                    self._drop()
                    raise DistStoreError(
                        f"{op}: malformed reply from {self._where()}", op=op, peer=self._peer()
                    )
                rseq, status, value = msg
                if 0 < rseq < seq:
                    continue  # a late reply to an earlier, timed-out request
                if rseq not in (0, seq):
                    self._drop()
                    raise DistStoreError(
                        f"{op}: reply out of order from {self._where()}", op=op, peer=self._peer()
                    )
                break
        return self._result(op, budget, status, value)

    def _result(self, op: str, budget: float, status: Any, value: Any) -> Any:
        if status == wire.Status.OK:
            return value
        where = self._where()
        if status == wire.Status.TIMEOUT:
            raise DistTimeoutError(
                f"{op}: keys {value} did not appear in the store at {where} within {budget:.1f} s "
                "(timeout is set by the timeout argument or DISTRIB_TIMEOUT)",
                op=op,
                peer=self._peer(),
            )
        if status == wire.Status.AUTH:
            self._drop()
            raise DistAuthError(
                f"{op}: the store at {where} refused the request: {value}", op=op, peer=self._peer()
            )
        raise DistStoreError(
            f"{op}: the store at {where} refused the request: {value}", op=op, peer=self._peer()
        )

    def _check_sizes(self, op: str, args: list[Any], values: tuple[bytes, ...]) -> None:
        """Refuse what the server would refuse, before sending it."""
        lim = self._limits
        for v in values:
            if len(v) > lim.max_value_bytes:
                raise DistStoreError(
                    f"{op}: a value of {len(v)} bytes exceeds the store's limit of "
                    f"{lim.max_value_bytes} bytes (max_value_bytes); the store holds rendezvous "
                    "data, send tensors through collectives",
                    op=op,
                    peer=self._peer(),
                )
        keys = args[0] if args and isinstance(args[0], list) else args[:1]
        if len(keys) > lim.max_keys_per_request:
            raise DistStoreError(
                f"{op}: {len(keys)} keys exceed the store's limit of {lim.max_keys_per_request} "
                "per request (max_keys_per_request)",
                op=op,
            )
        for k in keys:
            if isinstance(k, str) and len(k.encode()) > lim.max_key_bytes:
                raise DistStoreError(
                    f"{op}: a key of {len(k.encode())} bytes exceeds the store's limit of "
                    f"{lim.max_key_bytes} bytes (max_key_bytes)",
                    op=op,
                )

    def _join_and_wait(self, world_size: int) -> None:
        joined = self.add("__distrib/store_joined", 1)
        if joined == world_size:
            self.set("__distrib/store_ready", b"1")
        try:
            self.wait(["__distrib/store_ready"])
        except DistTimeoutError:
            count = int(self.get("__distrib/store_joined"))
            raise DistTimeoutError(
                f"TCPStore: only {count} of world_size={world_size} processes joined the store at "
                f"{self.host}:{self.port} within {self.timeout:.1f} s",
                op="store.init",
                peer=f"{self.host}:{self.port}",
            ) from None

    # -- torch's methods --------------------------------------------------

    def set(self, key: str, value: str | bytes) -> None:
        """Store ``value`` under ``key`` (overwrites)."""
        data = _as_bytes(value, "value")
        self._request("set", [_as_key(key), data], values=(data,))

    def get(self, key: str) -> bytes:
        """Value of ``key``, waiting up to the store timeout for it to be set."""
        return self._request("get", [_as_key(key), self.timeout], wait_s=self.timeout)

    def add(self, key: str, amount: int) -> int:
        """Atomically add ``amount`` to the integer at ``key`` (missing = 0); return the sum."""
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"store.add: amount must be an int, got {amount!r}")
        if not -(1 << 63) <= amount < 1 << 63:
            raise ValueError(f"store.add: amount must fit in 64 bits, got {amount}")
        return self._request("add", [_as_key(key), amount])

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        """Set ``key`` to ``desired_value`` if it holds ``expected_value`` (or is missing and
        ``expected_value`` is empty); return the value now stored (torch's semantics)."""
        expected = _as_bytes(expected_value, "expected_value")
        desired = _as_bytes(desired_value, "desired_value")
        return self._request(
            "compare_set", [_as_key(key), expected, desired], values=(expected, desired)
        )

    def wait(self, keys: Iterable[str], timeout: Any = None) -> None:
        """Block until every key in ``keys`` exists (or raise ``DistTimeoutError``)."""
        if isinstance(keys, str):
            raise TypeError("store.wait: keys must be a list of strings, not one string")
        seconds = self.timeout if timeout is None else to_seconds(timeout)
        self._request("wait", [[_as_key(k) for k in keys], seconds], wait_s=seconds)

    def check(self, keys: Iterable[str]) -> bool:
        """True if every key exists; never waits."""
        if isinstance(keys, str):
            raise TypeError("store.check: keys must be a list of strings, not one string")
        return self._request("check", [[_as_key(k) for k in keys]])

    def multi_get(self, keys: list[str]) -> list[bytes | None]:
        return self._request("multi_get", [[_as_key(k) for k in keys]])

    def delete_key(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""
        return self._request("delete_key", [_as_key(key)])

    def num_keys(self) -> int:
        """Number of keys stored (including distrib's own bookkeeping keys)."""
        return self._request("num_keys", [])

    def clone(self) -> TCPStore:
        """A client of the same server with its own connection (for another thread)."""
        other = TCPStore(
            self.host,
            self.port,
            timeout=self.timeout,
            wait_for_workers=False,
            auth_token=self._secret,
        )
        other._strict = self._strict
        other.hosted_by = self.hosted_by
        return other

    def close(self) -> None:
        """Close this client's connection; the master also stops serving. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._drop()
        if self._server is not None and self._pid in (-1, os.getpid()):
            self._server.close()
            if self._token_file is not None and self._secret is not None:
                _auth.remove_token_file(self._token_file, self._secret)

    def __del__(self) -> None:
        try:
            if self._sock is not None and self._pid == os.getpid():
                self._sock.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "timeout": self.timeout,
            "secret": self._secret,
            "strict": self._strict,
            "world_size": self.world_size,
            "hosted_by": self.hosted_by,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.host, self.port, self.timeout = state["host"], state["port"], state["timeout"]
        self._secret, self.world_size = state["secret"], state["world_size"]
        self._strict, self.hosted_by = state["strict"], state["hosted_by"]
        self.is_master, self._server, self._token_file = False, None, None
        self._reset_connection()
        self._closed = False
