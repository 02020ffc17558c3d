"""Rendezvous stores with torch's interface: ``TCPStore``, ``FileStore``, ``PrefixStore``.

``TCPStore`` talks to a ``StoreServer`` (hosted by the master in a background
thread) over one ZeroMQ DEALER socket per process; requests carry an id so a
late reply to a timed-out request is recognised and dropped. Every call is
bounded by the store's timeout. A client rebuilds its socket after ``fork``
and pickles as a plain client (host, port, timeout, secret).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import zmq

from .._config import config
from .._errors import DistAuthError, DistStoreError, DistTimeoutError, DistUsageError
from .._validate import check_timeout
from . import _store_wire as wire
from ._store_server import StoreServer

__all__ = ["PrefixStore", "Store", "TCPStore", "to_seconds"]

DEFAULT_STORE_TIMEOUT_S = 300.0  # torch's default store timeout (5 minutes)


def to_seconds(timeout: Any, what: str = "timeout") -> float:
    """Accept a ``datetime.timedelta`` or a number of seconds; reject the rest.

    NaN, infinities, zero, negatives and more than a year raise ``DistUsageError``
    (a ``ValueError``) naming ``what``; a non-number raises ``TypeError``.
    """
    return check_timeout(timeout, what, DistUsageError)


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, got {type(value).__name__}")


def _as_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"store key must be a string, got {type(key).__name__}")
    return key


class Store:
    """Base of the key-value stores: torch's methods, each bounded by ``timeout``."""

    timeout: float

    def set(self, key: str, value: str | bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def add(self, key: str, amount: int) -> int:
        raise NotImplementedError

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        raise NotImplementedError

    def wait(self, keys: Iterable[str], timeout: Any = None) -> None:
        raise NotImplementedError

    def check(self, keys: Iterable[str]) -> bool:
        raise NotImplementedError

    def delete_key(self, key: str) -> bool:
        raise NotImplementedError

    def num_keys(self) -> int:
        raise NotImplementedError

    def multi_get(self, keys: list[str]) -> list[bytes | None]:
        """Values of ``keys`` (``None`` where missing) without waiting."""
        return [self.get(k) if self.check([k]) else None for k in keys]

    def set_timeout(self, timeout: Any) -> None:
        self.timeout = to_seconds(timeout)

    def clone(self) -> Store:
        """A store on the same data with its own connection (for another thread)."""
        return self

    def close(self) -> None:
        """Release sockets (and stop the server if this store hosts it)."""


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
        auth_token: shared secret; every request is HMAC-SHA256 signed. Default
            ``DISTRIB_AUTH_TOKEN``.
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
    ) -> None:
        if not isinstance(host, str) or not host:
            raise TypeError(f"TCPStore: host must be a non-empty string, got {host!r}")
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"TCPStore: port must be an int in 0..65535, got {port!r}")
        if port == 0 and not is_master:
            raise ValueError("TCPStore: port=0 is only valid for the master (is_master=True)")
        if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
            raise ValueError(f"TCPStore: world_size must be a positive int, got {world_size!r}")
        cfg = config()
        self.timeout = (
            to_seconds(timeout) if timeout is not None else cfg.timeout or DEFAULT_STORE_TIMEOUT_S
        )
        token = auth_token if auth_token is not None else cfg.auth_token
        self._secret = _as_bytes(token, "auth_token") if token else None
        self.host = host
        self.world_size = world_size
        self.is_master = is_master
        self._server: StoreServer | None = None
        if is_master:
            self._server = StoreServer(host, port, self._secret)
            self._server.start()
            port = self._server.port
        self.port = port
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pid = -1
        self._sock: zmq.Socket | None = None
        self._closed = False
        if world_size is not None and wait_for_workers:
            self._join_and_wait(world_size)

    def __repr__(self) -> str:
        role = "master" if self.is_master else "client"
        return f"TCPStore({self.host}:{self.port}, {role})"

    # -- plumbing ---------------------------------------------------------

    def _socket(self) -> zmq.Socket:
        if self._closed:
            from .._errors import DistClosedError

            raise DistClosedError(f"{self!r} is closed", op="store")
        if self._sock is None or self._pid != os.getpid():
            # After fork the parent's socket belongs to the parent: make our own.
            sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
            host = (
                f"[{self.host}]"
                if ":" in self.host and not self.host.startswith("[")
                else self.host
            )
            if host.startswith("["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(f"tcp://{host}:{self.port}")
            self._sock, self._pid = sock, os.getpid()
        return self._sock

    def _request(self, command: str, args: list[Any], wait_s: float | None = None) -> Any:
        """Send one request and wait for its reply (``wait_s``: server-side park time)."""
        op = f"store.{command}"
        budget = self.timeout if wait_s is None else wait_s
        with self._lock:
            sock = self._socket()
            request_id = next(self._ids)
            frames, nonce = wire.pack_request(request_id, command, args, self._secret)
            sock.send_multipart(frames)
            # The server answers parked requests at their deadline; allow a margin for that.
            margin = 1.0 if wait_s is not None else 0.0
            deadline = time.monotonic() + budget + margin
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                    raise DistTimeoutError(
                        f"{op}: no reply from the store at {self.host}:{self.port} within "
                        f"{budget:.1f} s; is the master running and reachable? (timeout is set by "
                        "the timeout argument or DISTRIB_TIMEOUT)",
                        op=op,
                        peer=f"{self.host}:{self.port}",
                    )
                reply = sock.recv_multipart()
                try:
                    rid, status, value, mac = wire.unpack_reply(reply)
                except ValueError:
                    continue  # garbage on our own socket: ignore, keep waiting
                if status == wire.STATUS_AUTH and rid in (request_id, -1):
                    raise DistAuthError(
                        f"{op}: the store at {self.host}:{self.port} refused the request: {value}",
                        op=op,
                        peer=f"{self.host}:{self.port}",
                    )
                if rid != request_id:
                    continue  # late reply to an earlier, timed-out request
                if self._secret is not None and (
                    mac is None
                    or not wire.hmac.compare_digest(mac, wire.sign(self._secret, reply[0], nonce))
                ):
                    raise DistAuthError(
                        f"{op}: reply from {self.host}:{self.port} failed authentication; "
                        "the server does not share this secret",
                        op=op,
                        peer=f"{self.host}:{self.port}",
                    )
                break
        if status == wire.STATUS_TIMEOUT:
            raise DistTimeoutError(
                f"{op}: keys {value} did not appear in the store at {self.host}:{self.port} "
                f"within {budget:.1f} s (timeout is set by the timeout argument or DISTRIB_TIMEOUT)",
                op=op,
                peer=f"{self.host}:{self.port}",
            )
        if status != wire.STATUS_OK:
            raise DistStoreError(
                f"{op}: the store at {self.host}:{self.port} refused the request: {value}",
                op=op,
                peer=f"{self.host}:{self.port}",
            )
        return value

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
        self._request("set", [_as_key(key), _as_bytes(value, "value")])

    def get(self, key: str) -> bytes:
        """Value of ``key``, waiting up to the store timeout for it to be set."""
        return self._request("get", [_as_key(key), self.timeout], wait_s=self.timeout)

    def add(self, key: str, amount: int) -> int:
        """Atomically add ``amount`` to the integer at ``key`` (missing = 0); return the sum."""
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"store.add: amount must be an int, got {amount!r}")
        return self._request("add", [_as_key(key), amount])

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        """Set ``key`` to ``desired_value`` if it holds ``expected_value`` (or is missing and
        ``expected_value`` is empty); return the value now stored (torch's semantics)."""
        return self._request(
            "compare_set",
            [
                _as_key(key),
                _as_bytes(expected_value, "expected_value"),
                _as_bytes(desired_value, "desired_value"),
            ],
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
        """A client of the same server with its own socket (safe to use from another thread)."""
        return TCPStore(
            self.host,
            self.port,
            timeout=self.timeout,
            wait_for_workers=False,
            auth_token=self._secret,
        )

    def close(self) -> None:
        """Close this client's socket; the master also stops serving. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            if self._sock is not None and self._pid == os.getpid():
                self._sock.close(0)
            self._sock = None
        if self._server is not None and self._pid in (-1, os.getpid()):
            self._server.close()

    def __del__(self) -> None:
        try:
            if self._sock is not None and self._pid == os.getpid():
                self._sock.close(0)
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "timeout": self.timeout,
            "secret": self._secret,
            "world_size": self.world_size,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.host, self.port, self.timeout = state["host"], state["port"], state["timeout"]
        self._secret, self.world_size = state["secret"], state["world_size"]
        self.is_master, self._server = False, None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pid, self._sock, self._closed = -1, None, False


class PrefixStore(Store):
    """A view of ``store`` where every key is prefixed with ``prefix + "/"``."""

    def __init__(self, prefix: str, store: Store) -> None:
        self.prefix = prefix
        self.store = store

    @property  # type: ignore[override]
    def timeout(self) -> float:  # type: ignore[override]
        return self.store.timeout

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{_as_key(key)}"

    def set(self, key: str, value: str | bytes) -> None:
        self.store.set(self._k(key), value)

    def get(self, key: str) -> bytes:
        return self.store.get(self._k(key))

    def add(self, key: str, amount: int) -> int:
        return self.store.add(self._k(key), amount)

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        return self.store.compare_set(self._k(key), expected_value, desired_value)

    def wait(self, keys: Iterable[str], timeout: Any = None) -> None:
        self.store.wait([self._k(k) for k in keys], timeout)

    def check(self, keys: Iterable[str]) -> bool:
        return self.store.check([self._k(k) for k in keys])

    def multi_get(self, keys: list[str]) -> list[bytes | None]:
        return self.store.multi_get([self._k(k) for k in keys])

    def delete_key(self, key: str) -> bool:
        return self.store.delete_key(self._k(key))

    def num_keys(self) -> int:
        return self.store.num_keys()

    def set_timeout(self, timeout: Any) -> None:
        self.store.set_timeout(timeout)

    def clone(self) -> PrefixStore:
        return PrefixStore(self.prefix, self.store.clone())

    def close(self) -> None:
        """A prefix view does not own the underlying store: nothing to close."""
