"""What one rank asked a collective to do, and what happens when ranks disagree.

Every collective and point-to-point call is described by a ``CallDesc`` (kind,
shape, dtype, reduce op, root, group). Before any byte reaches a user buffer
the group makes its ranks agree on it: each engine offers one primitive,
``Engine.agree`` (or, for its hottest collectives, the same comparison fused
into its first step), which exchanges the 64-bit ``digest`` of every rank's
descriptor and, only when they differ, the packed descriptors themselves. The
comparison and the error message live here, so no transport can forget a field.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, NamedTuple

import msgpack
import numpy as np

from .._errors import DistMismatchError

__all__ = [
    "CallDesc",
    "CallsDiffer",
    "describe",
    "digest",
    "mismatch_error",
    "p2p_mismatch_error",
    "pack",
    "unpack",
]

# A packed descriptor never exceeds this (a group of thousands of ranks is cut short):
# transports reserve this much room when they exchange descriptors.
MAX_PACKED = 512


class CallDesc(NamedTuple):
    """One rank's call: every field must be equal on every rank of the group.

    Attributes:
        op: the collective's name (``"all_reduce"``, ``"send"`` ...).
        shape: the shape of the array that decides the message size.
        dtype: numpy's ``dtype.str`` (``"<f4"``).
        reduce: the reduce op's name, ``""`` when the call does not reduce.
        root: the root's global rank, ``-1`` when the call has none.
        group: the global ranks of the group the call was issued on.
    """

    op: str
    shape: tuple[int, ...] = ()
    dtype: str = ""
    reduce: str = ""
    root: int = -1
    group: tuple[int, ...] = ()


class CallsDiffer(Exception):
    """Raised by an engine's agreement when ranks' descriptors differ.

    ``calls[q]`` is group rank ``q``'s descriptor (``None`` if it could not be
    read); every rank of the group raises it for the same op, so the group turns
    it into a ``DistMismatchError`` without aborting the others.
    """

    def __init__(self, calls: list[CallDesc | None], op: str) -> None:
        super().__init__("ranks passed different call descriptors")
        self.calls = calls
        self.op = op


@functools.lru_cache(maxsize=1024)
def digest(call: CallDesc) -> int:
    """A 63-bit fingerprint of ``call`` (fits numpy int64 and two 32-bit words)."""
    raw = hashlib.blake2b(pack(call), digest_size=8).digest()
    return int.from_bytes(raw, "little") >> 1


@functools.lru_cache(maxsize=1024)
def pack(call: CallDesc) -> bytes:
    """msgpack bytes of ``call`` (at most ``MAX_PACKED``: a huge group list is cut)."""
    group = list(call.group)
    while True:
        raw: bytes = msgpack.packb(
            [call.op, list(call.shape), call.dtype, call.reduce, call.root, group]
        )
        if len(raw) <= MAX_PACKED or not group:
            return raw
        group = group[: len(group) // 2]


def unpack(raw: Any) -> CallDesc | None:
    """The descriptor in ``raw``, or ``None`` for anything malformed (never raises)."""
    try:
        op, shape, dtype, reduce, root, group = msgpack.unpackb(bytes(raw), raw=False)
        call = CallDesc(
            str(op),
            tuple(int(x) for x in shape),
            str(dtype),
            str(reduce),
            int(root),
            tuple(int(x) for x in group),
        )
    except Exception:
        return None
    return call


def _dtype_name(dtype: str) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return dtype


def describe(call: CallDesc | None) -> str:
    """Plain words: ``broadcast(root=0, 1024 x float32, shape [1024] <f4)``."""
    if call is None:
        return "an unreadable call"
    parts = []
    if call.root >= 0:
        parts.append(f"root={call.root}")
    if call.reduce:
        parts.append(f"op={call.reduce}")
    if call.dtype:
        count = int(np.prod(call.shape)) if call.shape else 1
        shape = "[" + ", ".join(str(s) for s in call.shape) + "]"
        parts.append(f"{count} x {_dtype_name(call.dtype)}, shape {shape} {call.dtype}")
    return f"{call.op}(" + ", ".join(parts) + ")"


def _differing(a: CallDesc, b: CallDesc | None) -> str:
    if b is None:
        return "call"
    names = [
        {"op": "collective", "reduce": "reduce op"}.get(f, f)
        for f in CallDesc._fields
        if getattr(a, f) != getattr(b, f)
    ]
    return ", ".join(names) or "call"


def mismatch_error(
    calls: list[CallDesc | None], me: int, global_ranks: list[int], seq: int, op: str
) -> DistMismatchError:
    """The error group rank ``me`` raises when the ranks' ``calls`` (for op ``seq``) differ:
    it names this rank's call and the first differing one in plain words."""
    mine = calls[me]
    assert mine is not None
    other = next((q for q, c in enumerate(calls) if c != mine), me)
    lines = ""
    if len(calls) > 2:
        lines = "; all calls: " + ", ".join(
            f"rank {global_ranks[q]}: {describe(c)}" for q, c in enumerate(calls)
        )
    return DistMismatchError(
        f"{op}: mismatched collectives at op #{seq}: rank {global_ranks[me]} called "
        f"{describe(mine)} but rank {global_ranks[other]} called {describe(calls[other])} "
        f"(the {_differing(mine, calls[other])} differs){lines}; every rank of the group must "
        "call the same collectives in the same order with matching arguments",
        rank=global_ranks[me],
        op=op,
        peer=global_ranks[other],
    )


def p2p_matches(sent: CallDesc | None, posted: CallDesc) -> bool:
    """Whether a message sent as ``sent`` may land in a receive posted as ``posted``."""
    return sent is not None and (sent.shape, sent.dtype) == (posted.shape, posted.dtype)


def p2p_mismatch_error(
    sender: int, receiver: int, sent: CallDesc | None, posted: CallDesc | None, tag: int, me: int
) -> DistMismatchError:
    """The error both ends of a mismatched ``send``/``recv`` raise (global ranks)."""
    op = "send" if me == sender else "recv"
    return DistMismatchError(
        f"{op}: mismatched point-to-point transfer with tag {tag}: rank {sender} called "
        f"{describe(sent)} but rank {receiver} called {describe(posted)}; nothing was "
        "written: send and recv must pass arrays of the same shape and dtype",
        rank=me,
        op=op,
        peer=receiver if me == sender else sender,
    )
