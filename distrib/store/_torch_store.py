"""A client of torch's c10d ``TCPStore`` server, so distrib ranks can meet in torchrun's store.

torchrun's agent serves a c10d store at ``MASTER_ADDR:MASTER_PORT`` and tells its
workers so with ``TORCHELASTIC_USE_AGENT_STORE=True``; binding that port fails.
This module speaks the server's small binary protocol (both the libuv and the
classic backend): one query-type byte, then arguments as little-endian
integers and ``uint64``-length-prefixed byte strings. Nothing is pickled.
Every call is bounded by the store's timeout; a connection whose reply stream
was interrupted is dropped and reopened on the next call.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .._errors import DistError, DistStoreError, DistTimeoutError
from ._base import PrefixStore, Store, _as_bytes, _as_key, to_seconds

__all__ = ["TorchTCPStoreClient", "torchelastic_store"]

_MAGIC = 0x3C85F7CE  # c10d's validation number, sent once per connection
_CANCEL_S = 10.0  # how long a cancelled wait may take to be acknowledged
_MAX_REPLY = 1 << 31  # refuse absurd lengths instead of allocating them
_MAX_ROUNDS = 1000  # rendezvous rounds probed for the current one


class _Query(enum.IntEnum):
    """c10d ``QueryType`` codes (TCPStoreBackend.hpp)."""

    VALIDATE = 0
    SET = 1
    COMPARE_SET = 2
    GET = 3
    ADD = 4
    CHECK = 5
    WAIT = 6
    GETNUMKEYS = 7
    DELETE_KEY = 8
    APPEND = 9
    MULTI_GET = 10
    MULTI_SET = 11
    CANCEL_WAIT = 12
    PING = 13


_READY = 0  # CheckResponseType.READY
_STOP_WAITING = 0  # WaitResponseType.STOP_WAITING
_WAIT_CANCELED = 1  # WaitResponseType.WAIT_CANCELED


def _blob(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _key(key: str) -> bytes:
    # torch's own clients put "/" before every key; we share their key space.
    return _blob(b"/" + _as_key(key).encode())


def _keys(keys: list[str]) -> bytes:
    return struct.pack("<Q", len(keys)) + b"".join(_key(k) for k in keys)


class TorchTCPStoreClient(Store):
    """torch's ``TCPStore`` as a client, with distrib's ``Store`` methods.

    Args:
        host: the server's address (``MASTER_ADDR``).
        port: its port (``MASTER_PORT``).
        timeout: ``timedelta`` or seconds bounding every call (default 300 s).
    """

    def __init__(self, host: str, port: int, timeout: Any = 300.0) -> None:
        if not isinstance(host, str) or not host:
            raise TypeError(f"TorchTCPStoreClient: host must be a non-empty string, got {host!r}")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"TorchTCPStoreClient: port must be in 1..65535, got {port!r}")
        self.host, self.port = host, port
        self.timeout = to_seconds(timeout)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = -1

    def __repr__(self) -> str:
        return f"TorchTCPStoreClient({self.host}:{self.port})"

    # -- plumbing ---------------------------------------------------------

    def _peer(self) -> str:
        return f"{self.host}:{self.port}"

    def _fail(
        self, op: str, what: str, exc: BaseException | None = None, timeouts: bool = True
    ) -> DistError:
        """Drop the connection (its reply stream is out of step) and describe why."""
        self._drop()
        detail = f": {exc}" if exc is not None else ""
        timed_out = timeouts and isinstance(exc, TimeoutError)
        cls: type[DistError] = DistTimeoutError if timed_out else DistStoreError
        return cls(
            f"store.{op}: torch TCPStore at {self._peer()} {what}{detail}",
            op=f"store.{op}",
            peer=self._peer(),
        )

    def _drop(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None

    def _connect(self, op: str) -> socket.socket:
        if self._sock is not None and self._pid == os.getpid():
            return self._sock
        self._sock = None  # after fork the parent's connection is the parent's
        deadline = time.monotonic() + self.timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection(
                    (self.host, self.port), timeout=max(0.1, deadline - time.monotonic())
                )
                break
            except OSError as exc:  # the agent may not be listening yet: retry until the deadline
                last = exc
                time.sleep(0.05)
        else:
            raise DistTimeoutError(
                f"store.{op}: cannot connect to torch TCPStore at {self._peer()} within "
                f"{self.timeout:.1f} s: {last}",
                op=f"store.{op}",
                peer=self._peer(),
            )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._pid = sock, os.getpid()
        try:
            sock.settimeout(self.timeout)
            nonce = int.from_bytes(os.urandom(4), "little")
            sock.sendall(
                struct.pack("<BI", _Query.VALIDATE, _MAGIC) + struct.pack("<BI", _Query.PING, nonce)
            )
            (echo,) = struct.unpack("<I", self._recv_exact(4))
        except OSError as exc:
            raise self._fail(
                op, "did not answer the handshake (is it a torch store?)", exc, timeouts=False
            )
        if echo != nonce:
            raise self._fail(op, f"answered the handshake with {echo:#x}, expected {nonce:#x}")
        return sock

    def _recv_exact(self, n: int) -> bytes:
        assert self._sock is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("connection closed by the server")
            buf += chunk
        return bytes(buf)

    def _recv_blob(self) -> bytes:
        (size,) = struct.unpack("<Q", self._recv_exact(8))
        if size > _MAX_REPLY:
            raise ConnectionError(f"reply announces {size} bytes")
        return self._recv_exact(size)

    def _call(self, op: str, payload: bytes, reply: str, n: int = 1) -> Any:
        """Send one query; read its reply: ``none``, ``u8``, ``i64``, ``blob`` or ``blobs``."""
        with self._lock:
            sock = self._connect(op)
            try:
                sock.settimeout(self.timeout)
                sock.sendall(payload)
                if reply == "none":
                    return None
                if reply == "u8":
                    return self._recv_exact(1)[0]
                if reply == "i64":
                    return struct.unpack("<q", self._recv_exact(8))[0]
                if reply == "blob":
                    return self._recv_blob()
                return [self._recv_blob() for _ in range(n)]
            except OSError as exc:
                raise self._fail(op, "failed mid-request", exc)

    # -- distrib's Store methods -----------------------------------------------

    def set(self, key: str, value: str | bytes) -> None:
        """Store ``value`` under ``key``."""
        data = _key(key) + _blob(_as_bytes(value, "value"))
        self._call("set", bytes([_Query.SET]) + data, "none")

    def get(self, key: str) -> bytes:
        """Value of ``key``, waiting up to the timeout for it to be set."""
        self.wait([key])
        return self._call("get", bytes([_Query.GET]) + _key(key), "blob")

    def add(self, key: str, amount: int) -> int:
        """Atomically add ``amount`` to the integer at ``key``; return the sum."""
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"store.add: amount must be an int, got {amount!r}")
        data = _key(key) + struct.pack("<q", amount)
        return self._call("add", bytes([_Query.ADD]) + data, "i64")

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        """torch's compare-and-set; returns the value now stored."""
        data = (
            _key(key)
            + _blob(_as_bytes(expected_value, "expected_value"))
            + _blob(_as_bytes(desired_value, "desired_value"))
        )
        return self._call("compare_set", bytes([_Query.COMPARE_SET]) + data, "blob")

    def check(self, keys: Iterable[str]) -> bool:
        """True if every key exists; never waits."""
        if isinstance(keys, str):
            raise TypeError("store.check: keys must be a list of strings, not one string")
        names = [_as_key(k) for k in keys]
        if not names:  # the server indexes keys[0]: never send it an empty list
            return True
        return self._call("check", bytes([_Query.CHECK]) + _keys(names), "u8") == _READY

    def wait(self, keys: Iterable[str], timeout: Any = None) -> None:
        """Block until every key exists, or raise ``DistTimeoutError`` after ``timeout``."""
        if isinstance(keys, str):
            raise TypeError("store.wait: keys must be a list of strings, not one string")
        names = [_as_key(k) for k in keys]
        seconds = self.timeout if timeout is None else to_seconds(timeout)
        if not names:
            return
        with self._lock:
            sock = self._connect("wait")
            try:
                sock.sendall(bytes([_Query.WAIT]) + _keys(names))
                sock.settimeout(seconds)
                try:
                    answer = self._recv_exact(1)[0]
                except TimeoutError:
                    answer = None
                if answer is not None:
                    if answer != _STOP_WAITING:
                        raise ConnectionError(f"unexpected wait reply {answer}")
                    return
                # Timed out: withdraw the wait; the server may have answered in between.
                sock.settimeout(_CANCEL_S)
                sock.sendall(bytes([_Query.CANCEL_WAIT]))
                answer = self._recv_exact(1)[0]
                if answer == _STOP_WAITING:
                    answer = self._recv_exact(1)[0]
                if answer != _WAIT_CANCELED:
                    raise ConnectionError(f"unexpected cancel reply {answer}")
            except OSError as exc:
                raise self._fail("wait", "failed mid-request", exc)
        raise DistTimeoutError(
            f"store.wait: keys {names} did not appear in torch TCPStore at {self._peer()} "
            f"within {seconds:.1f} s",
            op="store.wait",
            peer=self._peer(),
        )

    def multi_get(self, keys: list[str]) -> list[bytes | None]:
        """Values of ``keys`` (``None`` where missing) without waiting."""
        present = [k for k in keys if self.check([k])]
        if not present:
            return [None] * len(keys)
        values = self._call(
            "multi_get", bytes([_Query.MULTI_GET]) + _keys(present), "blobs", len(present)
        )
        found = dict(zip(present, values, strict=True))
        return [found.get(k) for k in keys]

    def delete_key(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""
        data = bytes([_Query.DELETE_KEY]) + _key(key)
        return self._call("delete_key", data, "i64") == 1

    def num_keys(self) -> int:
        """Number of keys on the server (torchrun's own included)."""
        return self._call("num_keys", bytes([_Query.GETNUMKEYS]), "i64")

    def clone(self) -> TorchTCPStoreClient:
        """Another client of the same server, with its own connection."""
        return TorchTCPStoreClient(self.host, self.port, self.timeout)

    def close(self) -> None:
        """Close this client's connection (the server is torchrun's, it stays up)."""
        with self._lock:
            self._drop()

    def __getstate__(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["host"], state["port"], state["timeout"])  # type: ignore[misc]


def _round_of(client: TorchTCPStoreClient, run_id: str) -> str:
    """torchrun's c10d rendezvous round of this worker group, or ``""`` if not found.

    A membership change starts a new round without counting a restart, so
    ``TORCHELASTIC_RESTART_COUNT`` alone can repeat. The agents record each
    round's rank assignment at ``torch.rendezvous.<run id>.<round>/...`` (node 0
    is in every round); the highest round present is ours.
    """
    found = ""
    for rnd in range(_MAX_ROUNDS):
        key = f"torch.rendezvous.{run_id}.{rnd}/torchelastic/assigned_ranks/0"
        if not client.check([key]):
            break
        found = str(rnd)
    return found


def torchelastic_store(
    env: Mapping[str, str], host: str, port: int, timeout: float
) -> Store | None:
    """The store of torchrun's agent, namespaced for this attempt, or ``None`` if not under one.

    Keys live under ``distrib/<run id>/<restart>/<round>/<world size>/`` so a
    restarted or re-formed group never reads the previous group's keys.
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = TorchTCPStoreClient(host, port, timeout)
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    rnd = _round_of(client, run_id) or "-"
    world = env.get("WORLD_SIZE", "?")
    return _AgentStore(f"distrib/{run_id}/{restart}/{rnd}/{world}", client)


class _AgentStore(PrefixStore):
    """This attempt's view of torchrun's store; closing it closes our connection."""

    def close(self) -> None:
        self.store.close()
