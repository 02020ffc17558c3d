"""Wire format of the TCPStore: length-prefixed msgpack frames over one TCP connection.

Every frame is a 4-byte big-endian length, then a msgpack body and, on an
authenticated connection, a 32-byte HMAC-SHA256 tag. A connection starts with a
handshake that proves both sides hold the shared secret without sending it:

1. server -> ``[MAGIC, VERSION, server_nonce, auth_required, limits]``
2. client -> ``[client_nonce, proof]``, proof = HMAC(secret, "client" + nonces)
3. server -> ``[status, server_proof, message]``; server_proof = HMAC(secret, "server" + nonces)

Both sides then derive a session key from the secret and the two fresh nonces.
Requests ``[seq, command, args]`` carry ``seq`` = 1, 2, 3 ... on each connection
and are tagged with the session key; replies ``[seq, status, value]`` likewise.
A captured request cannot be replayed: on its own connection its ``seq`` is
spent, and on any other connection the session key differs. Nothing here ever
unpickles: msgpack with strict size limits only.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import struct
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

__all__ = [
    "HEADER",
    "MAGIC",
    "Limits",
    "Status",
    "check_timeout",
    "derive",
    "frame",
    "parse_limits",
    "unpack",
]

MAGIC = "distrib-store"
VERSION = 2
HEADER = struct.Struct(">I")
TAG_BYTES = 32
NONCE_BYTES = 16
# A handshake frame is small; anything bigger before authentication is refused.
MAX_HANDSHAKE_BYTES = 4096


class Status(enum.IntEnum):
    """Reply status codes."""

    OK = 0
    ERROR = 1  # bad request or a limit reached; the value says which
    TIMEOUT = 2  # a get/wait's keys did not appear in time; the value lists them
    AUTH = 3  # authentication failed or a request was replayed
    LIMIT = 4  # a store limit was reached; the value names it


@dataclass(frozen=True)
class Limits:
    """What one store accepts; the server announces its limits in its hello."""

    max_value_bytes: int = 64 << 20
    max_key_bytes: int = 4096
    max_total_bytes: int = 1 << 30
    max_keys: int = 1_000_000
    max_connections: int = 4096
    max_parked: int = 65536
    max_parked_per_connection: int = 1024
    max_keys_per_request: int = 65536
    max_timeout_s: float = 1e8  # about three years: longer is a mistake, not a timeout

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame either side sends (two values and their keys, plus framing)."""
        return 2 * self.max_value_bytes + (1 << 20)


def parse_limits(doc: Any) -> Limits:
    """Limits from a server's hello; ``ValueError`` if malformed."""
    if not isinstance(doc, dict):
        raise ValueError("limits are not a map")
    known = asdict(Limits())
    values: dict[str, Any] = {}
    for name, default in known.items():
        v = doc.get(name, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 1:
            raise ValueError(f"limit {name} is {v!r}")
        values[name] = type(default)(v)
    return Limits(**values)


def limits_doc(limits: Limits) -> dict[str, Any]:
    return asdict(limits)


def derive(secret: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HMAC-SHA256(secret, label + nonces): handshake proofs and the session key."""
    return hmac.new(secret, label + server_nonce + client_nonce, hashlib.sha256).digest()


def frame(body_obj: Any, key: bytes | None, direction: bytes) -> bytes:
    """One frame: length, msgpack body and (with a session key) its tag."""
    body = msgpack.packb(body_obj, use_bin_type=True)
    if key is not None:
        body += hmac.new(key, direction + body, hashlib.sha256).digest()
    return HEADER.pack(len(body)) + body


def open_frame(payload: bytes, key: bytes | None, direction: bytes) -> Any:
    """Check the tag (if ``key``) and decode; ``ValueError`` on any defect, never worse."""
    if key is not None:
        if len(payload) < TAG_BYTES:
            raise PermissionError("frame too short to carry an authentication tag")
        body, tag = payload[:-TAG_BYTES], payload[-TAG_BYTES:]
        good = hmac.new(key, direction + body, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, good):
            raise PermissionError("authentication tag does not match")
        payload = body
    return unpack(payload)


def unpack(data: bytes) -> Any:
    """msgpack decode with hostile-input limits; ``ValueError`` on anything malformed."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=1 << 17,
            max_map_len=1 << 10,
            max_ext_len=0,
            max_str_len=len(data),
            max_bin_len=len(data),
        )
    except Exception as exc:  # msgpack raises many types on hostile input
        raise ValueError(f"undecodable msgpack ({type(exc).__name__})") from None


def check_timeout(value: Any, limits: Limits, what: str = "timeout") -> float:
    """A finite number of seconds in [0, max_timeout_s]; ``ValueError`` naming the problem."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{what} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or not 0 <= seconds <= limits.max_timeout_s:
        raise ValueError(
            f"{what} must be finite and in [0, {limits.max_timeout_s:g}] seconds, got {value!r}"
        )
    return seconds
