"""The store's fault table: hostile and malformed traffic, one row per kind, bounded counts.

Each row sends ``count`` messages of one kind to a running store over raw TCP
(``RawClient`` speaks the wire protocol by hand) and records what came back:
an error reply, a closed connection, or (the failure) nothing / an OK to a bad
request. After every batch the server thread must be alive and a real
``TCPStore`` client must still ``set``/``get``. ``tests/test_store_fuzz.py`` runs
the table; ``benchmarks/campaign_store.py`` runs it at 10x the counts.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from distrib.store import _wire as wire

BATCH = 250  # check the server after this many messages
MARKER = "/tmp/distrib-store-fuzz-unpickled"  # a pickle payload would create this


class RawClient:
    """One TCP connection speaking the store protocol by hand."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.buf = bytearray()
        self.key: bytes | None = None
        self.seq = 0
        hello = self.read()
        assert isinstance(hello, list) and hello[0] == wire.MAGIC, hello
        self.nonce: bytes = hello[2]
        self.auth_required: bool = hello[3]

    def payload(self) -> bytes | None:
        """Next frame's payload, ``None`` when the server closed the connection."""
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack_from(">I", self.buf)
                if len(self.buf) >= 4 + n:
                    out = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return out
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.buf += data

    def read(self) -> Any:
        p = self.payload()
        if p is None:
            return None
        if self.key is not None:
            return wire.open_frame(p, self.key, b"r")
        return msgpack.unpackb(p, raw=False)

    def handshake(self, secret: bytes | None) -> Any:
        cn = os.urandom(16)
        proof = wire.derive(secret, b"client", self.nonce, cn) if secret else b""
        self.send_raw(wire.frame([cn, proof], None, b""))
        reply = self.read()
        if secret and reply and reply[0] == 0 and isinstance(reply[1], bytes):
            self.key = wire.derive(secret, b"session", self.nonce, cn)
        return reply

    def send_raw(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def request_frame(self, command: Any, args: Any, seq: Any = None) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return wire.frame([seq, command, args], self.key, b"q")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Tally:
    """What one row's messages got back."""

    sent: int = 0
    error_replies: int = 0
    closed: int = 0
    ok_replies: int = 0  # OK replies to messages that are valid (e.g. a pickle stored as bytes)
    ok_to_bad: int = 0  # an OK reply to a malformed request: a failure
    silent: int = 0  # neither reply nor close within the timeout: a failure
    store_deaths: int = 0
    bad_checks: int = 0  # a valid client failed after a batch
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# -- message generators: (rng, client) -> bytes to send; the client is handshaken ----

_BAD_TIMEOUTS: list[Any] = [
    math.inf, -math.inf, math.nan, "1e999", 1e306, 1.8e308, -1, -1e-9, 1e9, True, None, [1], b"1",
    {"s": 1}, 2**63, -(2**63),
]  # fmt: skip
# Never valid in any argument position of any command.
_JUNK: list[Any] = [None, True, False, {"a": 1}, [[1]], [None], 2**64 - 1, math.nan, math.inf]


def _random_bytes(rng: random.Random, c: RawClient) -> bytes:
    return rng.randbytes(rng.randrange(1, 300))


def _random_frame(rng: random.Random, c: RawClient) -> bytes:
    body = rng.randbytes(rng.randrange(0, 300))
    return struct.pack(">I", len(body)) + body


def _truncated(rng: random.Random, c: RawClient) -> bytes:
    full = c.request_frame("set", ["k", rng.randbytes(rng.randrange(1, 200))])
    return full[: rng.randrange(1, len(full))]


def _huge_length(rng: random.Random, c: RawClient) -> bytes:
    n = rng.choice([2**32 - 1, 2**31, 1 << 30, (256 << 20) + rng.randrange(1 << 20)])
    return struct.pack(">I", n) + rng.randbytes(rng.randrange(0, 64))


def _wrong_types(rng: random.Random, c: RawClient) -> bytes:
    command = rng.choice(["set", "get", "add", "compare_set", "wait", "check", "multi_get",
                          "delete_key", "num_keys", "ping", "nosuch", 7, None, b"set"])  # fmt: skip
    n = rng.randrange(0, 4)
    args: Any = [rng.choice(_JUNK) for _ in range(n)]
    if rng.random() < 0.1:
        args = rng.choice(_JUNK)
    if command in ("num_keys", "ping") and isinstance(args, list) and not args:
        args = [1]  # keep it malformed: these take no arguments
    return c.request_frame(command, args)


def _nonfinite_timeout(rng: random.Random, c: RawClient) -> bytes:
    t = rng.choice(_BAD_TIMEOUTS)
    if rng.random() < 0.5:
        return c.request_frame("get", [f"missing{rng.randrange(9)}", t])
    return c.request_frame("wait", [["missing"], t])


def _limits(rng: random.Random, c: RawClient) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return c.request_frame("set", ["k" * 5000, b"v"])  # key over max_key_bytes
    if kind == 1:
        return c.request_frame("add", ["n", 2**64 - 1])  # leaves the int64 range
    if kind == 2:
        return c.request_frame("check", [["k"] * 70000])  # over max_keys_per_request
    return c.request_frame("wait", [["k"] * 70000, 1.0])


def _pickle_payload(rng: random.Random, c: RawClient) -> bytes:
    class Evil:
        def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
            return (open, (MARKER, "w"))

    blob = pickle.dumps(Evil(), protocol=rng.randrange(2, 6))
    if rng.random() < 0.5:
        return struct.pack(">I", len(blob)) + blob
    return c.request_frame("set", ["k", blob])  # stored as opaque bytes, never unpickled


@dataclass(frozen=True)
class Fault:
    """One row of the table."""

    id: str
    count: int
    make: Callable[[random.Random, RawClient], bytes]
    handshake: bool  # send after a valid handshake (True) or instead of it (False)
    expect_ok: bool = False  # some messages are valid (e.g. a pickle stored as bytes)


def _unauthenticated(port: int, secret: bytes, rng: random.Random, tally: Tally) -> None:
    """A handshake without the secret (none, or a wrong one), then a request."""
    c = RawClient(port)
    wrong = None if rng.random() < 0.5 else rng.randbytes(16)
    reply = c.handshake(wrong)
    c.send_raw(wire.frame([1, "set", ["failed", b"forged"]], None, b"q"))
    _settle(c, reply, tally, expect_ok=False)


def _replayed(port: int, secret: bytes, rng: random.Random, tally: Tally) -> None:
    """Capture a signed request, then replay it on its own connection and on a new one."""
    a = RawClient(port)
    a.handshake(secret)
    captured = a.request_frame("set", ["replay", b"original"])
    a.send_raw(captured)
    first = a.read()
    assert first is not None and first[1] == wire.Status.OK, first
    for _ in range(rng.randrange(0, 5)):
        a.send_raw(a.request_frame("ping", []))
        a.read()
    where = rng.randrange(2)
    if where == 0:
        a.send_raw(captured)  # same connection, spent sequence number
        _settle(a, None, tally, expect_ok=False)
    else:
        b = RawClient(port)
        b.handshake(secret)
        b.send_raw(captured)  # another connection: another session key
        _settle(b, None, tally, expect_ok=False)
    a.close()


FAULTS: list[Fault] = [
    Fault("random-bytes-before-handshake", 1000, _random_bytes, handshake=False),
    Fault("random-frames-before-handshake", 1000, _random_frame, handshake=False),
    Fault("truncated-frames", 1000, _truncated, handshake=True),
    Fault("huge-lengths", 600, _huge_length, handshake=True),
    Fault("random-frames-after-handshake", 1200, _random_frame, handshake=True),
    Fault("wrong-types", 2400, _wrong_types, handshake=True),
    Fault("non-finite-and-absurd-timeouts", 1200, _nonfinite_timeout, handshake=True),
    Fault("limits", 400, _limits, handshake=True),
    Fault("pickle-payload", 200, _pickle_payload, handshake=True, expect_ok=True),
]
# Rows that need the whole connection under their control.
SPECIAL: dict[str, tuple[int, Callable[[int, bytes, random.Random, Tally], None]]] = {
    "unauthenticated": (500, _unauthenticated),
    "replayed": (500, _replayed),
}
ROW_IDS = [f.id for f in FAULTS] + list(SPECIAL)


def total_messages(scale: int = 1) -> int:
    return scale * (sum(f.count for f in FAULTS) + sum(n for n, _ in SPECIAL.values()))


def _settle(c: RawClient, reply: Any, tally: Tally, expect_ok: bool) -> None:
    """Read what the server answers until it closes or goes quiet; classify it."""
    tally.sent += 1
    got_error = reply is not None and reply[0] == 0 and isinstance(reply[1], int)
    c.sock.settimeout(5.0)
    try:
        while True:
            try:
                msg = c.read()
            except (PermissionError, ValueError):
                msg = None
            if msg is None:
                tally.closed += 1
                return
            status = msg[1] if isinstance(msg, list) and len(msg) == 3 else None
            if status == wire.Status.OK and not expect_ok:
                tally.ok_to_bad += 1
                tally.notes.append(repr(msg)[:200])
            else:
                got_error = True
            c.sock.settimeout(0.05)  # more replies may follow; a quiet socket ends it
    except TimeoutError:
        if not got_error:
            tally.silent += 1
        else:
            tally.error_replies += 1
    finally:
        c.close()


def run_row(
    row_id: str,
    port: int,
    secret: bytes,
    check: Callable[[], bool],
    alive: Callable[[], bool],
    scale: int = 1,
    seed: int = 0,
) -> Tally:
    """Send one row's messages (``scale`` x its count); check the server after each batch."""
    rng = random.Random(f"{row_id}/{seed}")
    tally = Tally()
    t0 = time.monotonic()
    if row_id in SPECIAL:
        count, fn = SPECIAL[row_id]
        count *= scale
        for i in range(count):
            fn(port, secret, rng, tally)
            if (i + 1) % BATCH == 0 or i + 1 == count:
                _batch_check(tally, check, alive)
        tally.seconds = time.monotonic() - t0
        return tally
    fault = next(f for f in FAULTS if f.id == row_id)
    count = fault.count * scale
    c: RawClient | None = None
    for i in range(count):
        if c is None:
            c = RawClient(port)
            if fault.handshake:
                c.handshake(secret)
        data = fault.make(rng, c)
        if not c.send_raw(data):
            tally.sent += 1
            tally.closed += 1
            c.close()
            c = None
        elif fault.id.startswith("truncated") or not fault.handshake:
            c.sock.shutdown(socket.SHUT_WR)  # the rest never comes
            _settle(c, None, tally, fault.expect_ok)
            c = None
        else:
            tally.sent += 1
            if not _one_reply(c, tally, fault.expect_ok):
                c.close()
                c = None
        if (i + 1) % BATCH == 0 or i + 1 == count:
            if c is not None:
                c.close()
                c = None
            _batch_check(tally, check, alive)
    tally.seconds = time.monotonic() - t0
    return tally


def _one_reply(c: RawClient, tally: Tally, expect_ok: bool) -> bool:
    """Read the reply to one in-session message; False once the connection is closed."""
    c.sock.settimeout(5.0)
    try:
        msg = c.read()
    except TimeoutError:
        tally.silent += 1
        return False
    except (PermissionError, ValueError):
        msg = None
    if msg is None:
        tally.closed += 1
        return False
    status = msg[1] if isinstance(msg, list) and len(msg) == 3 else None
    if status == wire.Status.OK and not expect_ok:
        tally.ok_to_bad += 1
        tally.notes.append(repr(msg)[:200])
    elif status == wire.Status.OK:
        tally.ok_replies += 1
    else:
        tally.error_replies += 1
    if msg[0] == 0:  # a fatal error: the server closes this connection next
        c.read()
        return False
    return True


def _batch_check(tally: Tally, check: Callable[[], bool], alive: Callable[[], bool]) -> None:
    if not alive():
        tally.store_deaths += 1
    if not check():
        tally.bad_checks += 1
