"""The checkpoint file: ``DISTCKPT``, version, header length, msgpack header, array bytes."""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgpack
import numpy as np

from .._errors import DistError

__all__ = ["Checkpoint", "CheckpointError", "load", "save"]

_MAGIC = b"DISTCKPT"
_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_MAX_HEADER = 1 << 30


class CheckpointError(DistError):
    """A checkpoint file is missing, corrupt, truncated or of another format."""


class Checkpoint(NamedTuple):
    """What ``load`` returns: the arrays (name -> array) and the metadata."""

    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any]


def _bytes_of(arr: np.ndarray) -> memoryview:
    """The raw bytes of a C-contiguous array, without a copy."""
    return memoryview(arr.reshape(-1).view(np.uint8).data)


def _rank() -> int:
    """This process's rank in the default group, or 0 without one."""
    from ..comm import _api

    return _api.get_rank() if _api.is_initialized() else 0


def _check_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"checkpoint.save: arrays must be a dict of name -> array, got {type(arrays).__name__}"
        )
    out = {}
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"checkpoint.save: array names must be strings, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise TypeError(
                f"checkpoint.save: array {name!r} has dtype object; only plain numeric/bytes "
                "dtypes are stored (nothing is pickled)"
            )
        out[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")  # 0-d stays 0-d
    return out


def save(
    path: str | os.PathLike[str],
    arrays: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    rank: int | None = None,
    sync: bool = True,
) -> bool:
    """Write ``arrays`` and ``metadata`` to ``path`` atomically if this is rank 0.

    Call it on every rank: rank 0 (``rank``, default the default group's rank)
    writes, and with ``sync`` and a process group initialized every rank then
    waits at a barrier, so all can ``load`` the new file at once. Returns True
    where this process wrote the file.

    Raises:
        TypeError / ValueError: an array of object dtype, metadata msgpack cannot encode.
        CheckpointError: the file could not be written (names the path and the OS error).
    """
    path = os.fspath(path)
    data = _check_arrays(arrays)
    meta = dict(metadata or {})
    try:
        packed_meta = msgpack.packb(meta, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(
            f"checkpoint.save: metadata must be msgpack-able (dict of str, int, float, bytes, lists ...): {exc}"
        ) from None
    who = _rank() if rank is None else rank
    wrote = False
    if who == 0:
        _write(path, data, packed_meta)
        wrote = True
    if sync and rank is None:
        from ..comm import _api

        if _api.is_initialized() and _api.get_world_size() > 1:
            from ..comm import barrier

            barrier()
    return wrote


def _write(path: str, data: dict[str, np.ndarray], packed_meta: bytes) -> None:
    entries = []
    offset = 0
    for name, arr in data.items():
        nbytes = arr.nbytes
        entries.append(
            {
                "name": name,
                "dtype": np.lib.format.dtype_to_descr(arr.dtype),
                "shape": list(arr.shape),
                "offset": offset,
                "nbytes": nbytes,
                "crc": zlib.crc32(_bytes_of(arr)) if nbytes else 0,
            }
        )
        offset += nbytes
    header = msgpack.packb(
        {
            "arrays": entries,
            "metadata": packed_meta,
            "data_bytes": offset,
            "meta_crc": zlib.crc32(packed_meta),
        },
        use_bin_type=True,
    )
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    try:
        with open(tmp, "wb") as f:
            f.write(_PREFIX.pack(_MAGIC, _VERSION, len(header)))
            f.write(header)
            f.write(struct.pack("<I", zlib.crc32(header)))
            for arr in data.values():
                if arr.nbytes:
                    f.write(_bytes_of(arr))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint.save: cannot write {path!r}: {exc.strerror or exc}", op="checkpoint.save"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by ``save`` (any rank may call it).

    Raises:
        CheckpointError: the file is missing, not a checkpoint, truncated or corrupt
            (the message names the path and what is wrong).
    """
    path = os.fspath(path)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint.load: {path!r} {what}", op="checkpoint.load")

    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise bad(f"cannot be read: {exc.strerror or exc}") from None
    if len(blob) < _PREFIX.size:
        raise bad(f"is truncated ({len(blob)} bytes) or not a distrib checkpoint")
    magic, version, header_len = _PREFIX.unpack_from(blob)
    if magic != _MAGIC:
        raise bad("is not a distrib checkpoint (wrong magic bytes)")
    if version != _VERSION:
        raise bad(f"has format version {version}; this distrib reads version {_VERSION}")
    start = _PREFIX.size
    if header_len > _MAX_HEADER or start + header_len + 4 > len(blob):
        raise bad("is truncated (header incomplete)")
    header_bytes = blob[start : start + header_len]
    (crc,) = struct.unpack_from("<I", blob, start + header_len)
    if zlib.crc32(header_bytes) != crc:
        raise bad("is corrupt (header checksum mismatch)")
    try:
        header = msgpack.unpackb(header_bytes, raw=False)
        metadata = msgpack.unpackb(header["metadata"], raw=False)
        entries = header["arrays"]
        data_bytes = int(header["data_bytes"])
    except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
        raise bad(f"is corrupt (unreadable header: {exc})") from None
    base = start + header_len + 4
    if len(blob) != base + data_bytes:
        what = "truncated" if len(blob) < base + data_bytes else "corrupt (trailing bytes)"
        raise bad(f"is {what}: {len(blob) - base} data bytes, expected {data_bytes}")
    arrays: dict[str, np.ndarray] = {}
    for e in entries:
        try:
            dtype = np.lib.format.descr_to_dtype(e["dtype"])
            chunk = blob[base + e["offset"] : base + e["offset"] + e["nbytes"]]
            if len(chunk) != e["nbytes"] or zlib.crc32(chunk) != e["crc"]:
                raise bad(f"is corrupt (array {e['name']!r} fails its checksum)")
            arr = np.frombuffer(chunk, dtype=dtype).reshape(e["shape"]).copy()
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise bad(f"is corrupt (array entry {e!r}: {exc})") from None
        arrays[e["name"]] = arr
    if not isinstance(metadata, dict):
        raise bad("is corrupt (metadata is not a dict)")
    return Checkpoint(arrays, metadata)
