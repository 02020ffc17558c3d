"""The TCPStore server: a key-value map served from one background thread.

Protocol (see ``_store_wire``): clients send requests to a ZeroMQ ROUTER
socket; every request gets exactly one reply, possibly later: ``get`` and
``wait`` on missing keys are parked until the keys appear or the request's own
timeout passes (then a TIMEOUT reply). Malformed, oversized, unauthenticated or
replayed requests get an error reply and change nothing; the thread never dies
on bad input. Lifecycle: ``start()`` binds and spawns the thread; ``close()``
stops it within one poll interval and closes the socket.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from .._errors import DistStoreError
from . import _store_wire as wire

__all__ = ["StoreServer"]

_POLL_MS = 100  # stop-flag latency; parked requests are also checked this often


@dataclass
class _Parked:
    identity: bytes
    request_id: int
    nonce: bytes
    command: str
    keys: list[str]
    deadline: float
    done: bool = field(default=False)


class StoreServer:
    """Serve a key-value map on ``host:port`` (port 0: a free port, see ``port``)."""

    def __init__(self, host: str, port: int, secret: bytes | None) -> None:
        self._secret = secret
        self._data: dict[str, bytes] = {}
        self._parked: list[_Parked] = []
        self._nonces = wire.NonceWindow()
        self._stop = threading.Event()
        self._ctx: zmq.Context = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        if ":" in host and not host.startswith("["):
            self._sock.setsockopt(zmq.IPV6, 1)
            host = f"[{host}]"
        try:
            if port == 0:
                self.port = self._sock.bind_to_random_port(f"tcp://{host}")
            else:
                self._sock.bind(f"tcp://{host}:{port}")
                self.port = port
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise DistStoreError(
                f"TCPStore: cannot bind {host}:{port}: {exc}; pick another port or pass port=0",
                op="store.bind",
                peer=f"{host}:{port}",
            ) from None
        self._thread = threading.Thread(target=self._serve, name="distrib-store", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self._sock.close(0)

    # -- serving loop ------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                ready = self._sock.poll(self._poll_timeout_ms())
            except zmq.ZMQError:
                return
            if ready:
                # Drain what is queued so a flood cannot starve the stop check forever.
                for _ in range(1000):
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        return
                    self._handle(frames)
            self._expire_parked()

    def _poll_timeout_ms(self) -> int:
        if not self._parked:
            return _POLL_MS
        nearest = min(p.deadline for p in self._parked) - time.monotonic()
        return max(0, min(_POLL_MS, int(nearest * 1000) + 1))

    def _reply(
        self, identity: bytes, request_id: int, status: int, value: Any, nonce: bytes
    ) -> None:
        frames = wire.pack_reply(request_id, status, value, nonce, self._secret)
        try:
            self._sock.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # client gone or its queue full: it will time out on its side

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return  # no identity: nothing to reply to
        identity, payload = frames[0], frames[1:]
        try:
            request_id, nonce, stamp, command, args, mac = wire.unpack_request(payload)
        except ValueError as exc:
            self._reply(identity, -1, wire.STATUS_ERROR, f"malformed request: {exc}", b"")
            return
        if self._secret is not None:
            body = payload[0]
            good = mac is not None and wire.hmac.compare_digest(mac, wire.sign(self._secret, body))
            if not good:
                self._reply(
                    identity,
                    request_id,
                    wire.STATUS_AUTH,
                    "authentication failed: this store requires the shared secret "
                    "(auth_token argument or DISTRIB_AUTH_TOKEN)",
                    nonce,
                )
                return
            if not self._nonces.fresh(nonce, stamp, time.time()):
                self._reply(
                    identity, request_id, wire.STATUS_AUTH, "replayed or stale request", nonce
                )
                return
        try:
            status, value = self._execute(identity, request_id, nonce, command, args)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            status, value = wire.STATUS_ERROR, f"bad arguments for {command!r}: {exc}"
        if status is not None:
            self._reply(identity, request_id, status, value, nonce)

    # -- commands ----------------------------------------------------------

    def _execute(
        self, identity: bytes, request_id: int, nonce: bytes, command: str, args: list[Any]
    ) -> tuple[int | None, Any]:
        data = self._data
        if command == "set":
            key, value = _key(args[0]), _value(args[1])
            data[key] = value
            self._wake()
            return wire.STATUS_OK, None
        if command == "add":
            key, amount = _key(args[0]), args[1]
            if not isinstance(amount, int) or isinstance(amount, bool):
                raise TypeError("amount must be an integer")
            try:
                current = int(data.get(key, b"0"))
            except ValueError:
                raise ValueError(f"key {key!r} does not hold an integer") from None
            data[key] = str(current + amount).encode()
            self._wake()
            return wire.STATUS_OK, current + amount
        if command == "compare_set":
            key, expected, desired = _key(args[0]), _value(args[1]), _value(args[2])
            stored = data.get(key)
            if (stored is None and expected == b"") or stored == expected:
                data[key] = desired
                self._wake()
                return wire.STATUS_OK, desired
            return wire.STATUS_OK, expected if stored is None else stored
        if command in ("get", "wait"):
            keys = [_key(k) for k in (args[0] if command == "wait" else [args[0]])]
            timeout = float(args[1])
            if all(k in data for k in keys):
                return wire.STATUS_OK, data[keys[0]] if command == "get" else None
            parked = _Parked(
                identity, request_id, nonce, command, keys, time.monotonic() + max(timeout, 0.0)
            )
            self._parked.append(parked)
            return None, None
        if command == "multi_get":
            keys = [_key(k) for k in args[0]]
            return wire.STATUS_OK, [data.get(k) for k in keys]
        if command == "check":
            return wire.STATUS_OK, all(_key(k) in data for k in args[0])
        if command == "delete_key":
            return wire.STATUS_OK, data.pop(_key(args[0]), None) is not None
        if command == "num_keys":
            return wire.STATUS_OK, len(data)
        if command == "ping":
            return wire.STATUS_OK, None
        return wire.STATUS_ERROR, f"unknown command {command!r}"

    def _wake(self) -> None:
        """Answer parked requests whose keys now all exist."""
        if not self._parked:
            return
        still = []
        for p in self._parked:
            if all(k in self._data for k in p.keys):
                value = self._data[p.keys[0]] if p.command == "get" else None
                self._reply(p.identity, p.request_id, wire.STATUS_OK, value, p.nonce)
            else:
                still.append(p)
        self._parked = still

    def _expire_parked(self) -> None:
        if not self._parked:
            return
        now = time.monotonic()
        still = []
        for p in self._parked:
            if now >= p.deadline:
                missing = [k for k in p.keys if k not in self._data]
                self._reply(p.identity, p.request_id, wire.STATUS_TIMEOUT, missing, p.nonce)
            else:
                still.append(p)
        self._parked = still


def _key(obj: Any) -> str:
    if not isinstance(obj, str):
        raise TypeError(f"key must be a string, got {type(obj).__name__}")
    return obj


def _value(obj: Any) -> bytes:
    if not isinstance(obj, bytes):
        raise TypeError(f"value must be bytes, got {type(obj).__name__}")
    return obj
