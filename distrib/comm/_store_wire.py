"""Wire format of the TCPStore: msgpack requests, optional HMAC-SHA256 authentication.

A request is one or two ZeroMQ frames sent by a DEALER client to the server's
ROUTER socket: ``body`` and, when a shared secret is configured, ``mac``.
``body`` is msgpack ``[request_id, nonce, timestamp, command, args]``; ``mac``
is HMAC-SHA256(secret, body). The server rejects a request whose MAC is wrong,
whose timestamp is more than ``MAX_CLOCK_SKEW_S`` away from its clock, or whose
nonce it has already seen (replay). A reply is ``body`` (msgpack
``[request_id, status, value]``) plus, when authenticated, HMAC(secret, body +
request nonce), so a client knows the reply answers its own request.

Nothing here ever unpickles: msgpack with strict size limits only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from typing import Any

import msgpack

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "MAX_MESSAGE_BYTES",
    "NonceWindow",
    "pack_reply",
    "pack_request",
    "sign",
    "unpack_reply",
    "unpack_request",
]

# Largest request or reply the store accepts; values are rendezvous data, not tensors.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Requests older or newer than this are refused when authenticated (replay window).
MAX_CLOCK_SKEW_S = 300.0

STATUS_OK = 0
STATUS_ERROR = 1
STATUS_TIMEOUT = 2
STATUS_AUTH = 3


def sign(secret: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the concatenated ``parts``."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def pack_request(
    request_id: int, command: str, args: list[Any], secret: bytes | None
) -> tuple[list[bytes], bytes]:
    """Frames of one request and its nonce (to check the reply's MAC)."""
    nonce = os.urandom(16)
    body = msgpack.packb([request_id, nonce, time.time(), command, args], use_bin_type=True)
    if secret is None:
        return [body], nonce
    return [body, sign(secret, body)], nonce


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_array_len=1 << 16,
        max_map_len=1 << 16,
        max_ext_len=0,
    )


def unpack_request(frames: list[bytes]) -> tuple[int, bytes, float, str, list[Any], bytes | None]:
    """Decode a request; raise ``ValueError`` (never anything worse) if malformed."""
    if not 1 <= len(frames) <= 2:
        raise ValueError(f"expected 1 or 2 frames, got {len(frames)}")
    body = frames[0]
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError("request too large")
    try:
        msg = _unpack(body)
    except Exception as exc:  # msgpack raises many types on hostile input
        raise ValueError(f"undecodable request ({type(exc).__name__})") from None
    if not (isinstance(msg, list) and len(msg) == 5):
        raise ValueError("request is not a 5-element array")
    request_id, nonce, stamp, command, args = msg
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ValueError("request id is not an integer")
    if not isinstance(nonce, bytes) or len(nonce) != 16:
        raise ValueError("nonce is not 16 bytes")
    if not isinstance(stamp, (int, float)) or isinstance(stamp, bool):
        raise ValueError("timestamp is not a number")
    if not isinstance(command, str) or not isinstance(args, list):
        raise ValueError("command/args have the wrong types")
    mac = frames[1] if len(frames) == 2 else None
    return request_id, nonce, float(stamp), command, args, mac


def pack_reply(
    request_id: int, status: int, value: Any, nonce: bytes, secret: bytes | None
) -> list[bytes]:
    """Frames of one reply."""
    body = msgpack.packb([request_id, status, value], use_bin_type=True)
    if secret is None:
        return [body]
    return [body, sign(secret, body, nonce)]


def unpack_reply(frames: list[bytes]) -> tuple[int, int, Any, bytes | None]:
    """Decode a reply into (request_id, status, value, mac)."""
    if not 1 <= len(frames) <= 2:
        raise ValueError(f"expected 1 or 2 reply frames, got {len(frames)}")
    try:
        msg = _unpack(frames[0])
    except Exception as exc:
        raise ValueError(f"undecodable reply ({type(exc).__name__})") from None
    if not (isinstance(msg, list) and len(msg) == 3):
        raise ValueError("reply is not a 3-element array")
    return msg[0], msg[1], msg[2], frames[1] if len(frames) == 2 else None


class NonceWindow:
    """Remembers recent nonces to refuse replayed requests (bounded memory)."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._capacity = capacity

    def fresh(self, nonce: bytes, stamp: float, now: float) -> bool:
        """True (and remember it) if the nonce is new and the timestamp is recent."""
        if abs(now - stamp) > MAX_CLOCK_SKEW_S or nonce in self._seen:
            return False
        self._seen[nonce] = stamp
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True
