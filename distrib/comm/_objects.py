"""Object collectives (``broadcast_object_list`` ...) over msgpack, never pickle.

Objects are encoded with msgpack plus extension types for what msgpack lacks:
numpy arrays and scalars (dtype, shape, raw bytes), tuples, complex numbers,
integers beyond 64 bits and sets. Anything else raises ``TypeError`` naming its
type, on the rank that tried to send it (before any communication). Encoded
objects travel as uint8 arrays through the ordinary collectives: first their
lengths, then the padded bytes.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from .._errors import DistUsageError
from ._call import named_rank, resolve_group
from ._collectives import all_gather_into_tensor, broadcast, gather, scatter
from ._group import ProcessGroup
from ._p2p import recv, send, source_rank

__all__ = [
    "all_gather_object",
    "broadcast_object_list",
    "decode_object",
    "encode_object",
    "gather_object",
    "recv_object_list",
    "scatter_object_list",
    "send_object_list",
]

_EXT_NDARRAY, _EXT_TUPLE, _EXT_COMPLEX, _EXT_BIGINT, _EXT_SCALAR, _EXT_SET = range(1, 7)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufcSU" or obj.dtype.hasobject:
            raise TypeError(f"cannot send a numpy array of dtype {obj.dtype} as an object")
        arr = np.ascontiguousarray(obj)
        return msgpack.ExtType(
            _EXT_NDARRAY, msgpack.packb([arr.dtype.str, list(arr.shape), arr.tobytes()])
        )
    if isinstance(obj, np.generic):
        return msgpack.ExtType(
            _EXT_SCALAR, msgpack.packb([obj.dtype.str, np.asarray(obj).tobytes()])
        )
    if isinstance(obj, tuple):
        return msgpack.ExtType(_EXT_TUPLE, _pack(list(obj)))
    if isinstance(obj, (set, frozenset)):
        return msgpack.ExtType(_EXT_SET, _pack(list(obj)))
    if isinstance(obj, complex):
        return msgpack.ExtType(_EXT_COMPLEX, msgpack.packb([obj.real, obj.imag]))
    if isinstance(obj, int):
        return msgpack.ExtType(_EXT_BIGINT, str(int(obj)).encode())
    raise TypeError(
        f"object collectives carry msgpack data (None, bool, int, float, str, bytes, list, "
        f"tuple, dict, set, complex, numpy arrays); cannot send an object of type "
        f"{type(obj).__module__}.{type(obj).__qualname__}"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        dtype, shape, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
    if code == _EXT_SCALAR:
        dtype, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=np.dtype(dtype))[0]
    if code == _EXT_TUPLE:
        return tuple(_unpack(data))
    if code == _EXT_SET:
        return set(_unpack(data))
    if code == _EXT_COMPLEX:
        re, im = msgpack.unpackb(data)
        return complex(re, im)
    if code == _EXT_BIGINT:
        return int(data.decode())
    return msgpack.ExtType(code, data)


def _pack(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=True)
    except OverflowError as exc:
        raise TypeError(f"cannot send an integer outside the 64-bit range ({exc})") from None


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def encode_object(obj: Any) -> bytes:
    """msgpack bytes for ``obj``; ``TypeError`` naming the type msgpack cannot carry."""
    return _pack(obj)


def decode_object(data: bytes) -> Any:
    """Inverse of ``encode_object``."""
    return _unpack(bytes(data))


def _lengths(pg: ProcessGroup, mine: int, group: Any) -> np.ndarray:
    lens = np.zeros(pg.size(), np.int64)
    all_gather_into_tensor(lens, np.array([mine], np.int64), group=group)
    return lens


def broadcast_object_list(
    object_list: list[Any],
    src: int | None = None,
    group: Any = None,
    device: Any = None,
    group_src: int | None = None,
) -> None:
    """Replace ``object_list``'s items on every rank with those of rank ``src``
    (``group_src`` within ``group``; default global rank 0). ``device`` is accepted for
    torch's signature and unused: objects travel as msgpack bytes on the CPU."""
    pg = resolve_group(group, "broadcast_object_list")
    if pg is None:
        return
    src = named_rank(pg, "broadcast_object_list", "src", src, group_src, default=0)
    if not isinstance(object_list, list):
        raise TypeError(
            f"broadcast_object_list: object_list must be a list, got {type(object_list).__name__}"
        )
    is_src = pg.global_rank == src
    payload = encode_object(object_list) if is_src else b""
    length = np.array([len(payload)], np.int64)
    broadcast(length, src, group=group)
    buf = np.frombuffer(payload, np.uint8).copy() if is_src else np.empty(int(length[0]), np.uint8)
    broadcast(buf, src, group=group)
    if not is_src:
        received = decode_object(buf.tobytes())
        if len(received) != len(object_list):
            raise ValueError(
                f"broadcast_object_list: rank {src} sent {len(received)} objects but rank "
                f"{pg.global_rank}'s object_list has {len(object_list)} slots"
            )
        object_list[:] = received


def all_gather_object(object_list: list[Any], obj: Any, group: Any = None) -> None:
    """``object_list[i]`` gets rank i's ``obj`` on every rank."""
    pg = resolve_group(group, "all_gather_object")
    if pg is None:
        return
    if not isinstance(object_list, list) or len(object_list) != pg.size():
        raise ValueError(f"all_gather_object: object_list must be a list of {pg.size()} slots")
    payload = encode_object(obj)
    lens = _lengths(pg, len(payload), group)
    width = int(lens.max())
    mine = np.zeros(width, np.uint8)
    mine[: len(payload)] = np.frombuffer(payload, np.uint8)
    out = np.empty(width * pg.size(), np.uint8)
    all_gather_into_tensor(out, mine, group=group)
    for i in range(pg.size()):
        object_list[i] = decode_object(out[i * width : i * width + int(lens[i])].tobytes())


def gather_object(
    obj: Any,
    object_gather_list: list[Any] | None = None,
    dst: int | None = None,
    group: Any = None,
    group_dst: int | None = None,
) -> None:
    """Rank ``dst``'s ``object_gather_list[i]`` gets rank i's ``obj`` (``group_dst``: the
    destination within ``group``; default global rank 0)."""
    pg = resolve_group(group, "gather_object")
    if pg is None:
        return
    dst = named_rank(pg, "gather_object", "dst", dst, group_dst, default=0)
    is_dst = pg.global_rank == dst
    if is_dst and (
        not isinstance(object_gather_list, list) or len(object_gather_list) != pg.size()
    ):
        raise ValueError(
            f"gather_object: object_gather_list must be a list of {pg.size()} slots "
            f"on the destination rank {dst}"
        )
    payload = encode_object(obj)
    lens = _lengths(pg, len(payload), group)
    width = int(lens.max())
    mine = np.zeros(width, np.uint8)
    mine[: len(payload)] = np.frombuffer(payload, np.uint8)
    outs = [np.empty(width, np.uint8) for _ in range(pg.size())] if is_dst else None
    gather(mine, outs, dst=dst, group=group)
    if outs is not None and object_gather_list is not None:
        for i, out in enumerate(outs):
            object_gather_list[i] = decode_object(out[: int(lens[i])].tobytes())


def scatter_object_list(
    scatter_object_output_list: list[Any],
    scatter_object_input_list: list[Any] | None = None,
    src: int | None = None,
    group: Any = None,
    group_src: int | None = None,
) -> None:
    """``scatter_object_output_list[0]`` on rank i gets rank ``src``'s input item i
    (``group_src``: the source within ``group``; default global rank 0)."""
    pg = resolve_group(group, "scatter_object_list")
    if pg is None:
        return
    src = named_rank(pg, "scatter_object_list", "src", src, group_src, default=0)
    if not isinstance(scatter_object_output_list, list) or not scatter_object_output_list:
        raise ValueError("scatter_object_list: scatter_object_output_list must be a non-empty list")
    n, is_src = pg.size(), pg.global_rank == src
    if is_src:
        if not isinstance(scatter_object_input_list, list) or len(scatter_object_input_list) != n:
            raise ValueError(
                f"scatter_object_list: rank {src} needs a scatter_object_input_list of {n} objects"
            )
        payloads = [encode_object(o) for o in scatter_object_input_list]
        lens = np.array([len(p) for p in payloads], np.int64)
    else:
        payloads, lens = [], np.zeros(n, np.int64)
    broadcast(lens, src, group=group)
    width = int(lens.max())
    chunks = None
    if is_src:
        chunks = []
        for p in payloads:
            c = np.zeros(width, np.uint8)
            c[: len(p)] = np.frombuffer(p, np.uint8)
            chunks.append(c)
    mine = np.empty(width, np.uint8)
    scatter(mine, chunks, src=src, group=group)
    scatter_object_output_list[0] = decode_object(mine[: int(lens[pg.rank()])].tobytes())


def send_object_list(
    object_list: list[Any],
    dst: int | None = None,
    group: Any = None,
    device: Any = None,
    group_dst: int | None = None,
    use_batch: bool = False,
) -> None:
    """Send ``object_list``'s items to rank ``dst`` (``group_dst`` within ``group``), where
    ``recv_object_list`` with a list of as many slots takes them. ``device`` and
    ``use_batch`` are accepted for torch's signature: objects travel as msgpack bytes on
    the CPU, and the two messages (length, then bytes) are sends either way."""
    pg = resolve_group(group, "send_object_list")
    if pg is None:
        return
    dst = named_rank(pg, "send_object_list", "dst", dst, group_dst)
    _check_list(pg, "send_object_list", object_list)
    payload = encode_object(object_list)
    send(np.array([len(object_list), len(payload)], np.int64), dst, group=group)
    send(np.frombuffer(payload, np.uint8).copy(), dst, group=group)


def recv_object_list(
    object_list: list[Any],
    src: int | None = None,
    group: Any = None,
    device: Any = None,
    group_src: int | None = None,
    use_batch: bool = False,
) -> int:
    """Fill ``object_list`` with the items rank ``src`` (``group_src`` within ``group``)
    sent with ``send_object_list``; returns the sender's global rank (-1 on a rank outside
    ``group``). The two lists must have as many items."""
    pg = resolve_group(group, "recv_object_list")
    if pg is None:
        return -1
    src = source_rank(pg, "recv_object_list", src, group_src)
    _check_list(pg, "recv_object_list", object_list)
    header = np.zeros(2, np.int64)
    recv(header, src, group=group)
    count, length = int(header[0]), int(header[1])
    buf = np.empty(length, np.uint8)
    recv(buf, src, group=group)  # its size is checked against the sender's before a byte lands
    received = decode_object(buf.tobytes())
    if count != len(object_list) or not isinstance(received, list) or len(received) != count:
        raise DistUsageError(
            f"recv_object_list: rank {src} sent {count} objects but rank {pg.global_rank}'s "
            f"object_list has {len(object_list)} slots",
            rank=pg.global_rank,
            op="recv_object_list",
            peer=src,
        )
    object_list[:] = received
    return src


def _check_list(pg: ProcessGroup, op: str, object_list: Any) -> None:
    if not isinstance(object_list, list):
        raise TypeError(
            f"{op}: object_list must be a list on rank {pg.global_rank}, got "
            f"{type(object_list).__name__}"
        )
