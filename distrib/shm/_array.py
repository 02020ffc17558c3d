"""numpy arrays backed by shared memory, and the handles that carry them.

An array is shared when the end of its ``.base`` chain is a ``Block``: a byte
range of one ``Segment`` (a whole segment for big arrays, an arena slot for
small ones). The Block exposes ``__array_interface__``, so every view, slice or
``reshape`` of the array keeps the Block, and through it the mapping, alive.

A handle is a short tuple: the daemon address, segment id, kind, size, path,
the block's place in the segment, and the array's offset, shape, strides and
dtype. ``rebuild_array`` maps the segment once per process (a cache keyed by
segment id) and builds an ndarray over the same memory.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import numpy as np

from . import _arena, _client
from ._segment import Segment, cached_segment, create_segment, open_segment
from ._strategy import get_sharing_strategy

__all__ = [
    "ArrayHandle",
    "Block",
    "block_of",
    "empty",
    "full",
    "handle_of",
    "is_shared",
    "rebuild_array",
    "share",
    "zeros",
]


class Block:
    """A byte range of a shared segment that arrays view."""

    __slots__ = (
        "__array_interface__",
        "__weakref__",
        "epoch",
        "handed_out",
        "nbytes",
        "offset",
        "segment",
        "slab",
    )

    def __init__(
        self, segment: Segment, offset: int, nbytes: int, slab: _arena.Slab | None = None
    ) -> None:
        self.segment = segment
        self.offset = offset
        self.nbytes = nbytes
        self.slab = slab
        self.epoch = _arena.fork_epoch()
        self.handed_out = False
        self.__array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (segment.address + offset, False),
            "version": 3,
        }

    def __del__(self) -> None:
        if self.slab is not None:
            self.slab.release(self.offset, self.epoch, self.handed_out)


# (seg_id, offset) -> Block alive in this process, so a block received twice
# (or sent and received back) is the same object over the same mapping.
_blocks: weakref.WeakValueDictionary[tuple[str, int], Block] = weakref.WeakValueDictionary()


def _allocate(nbytes: int) -> tuple[Block, bool]:
    """A new Block of at least ``nbytes``; also whether its memory is known zero."""
    kind = get_sharing_strategy()
    if nbytes <= _arena.ARENA_MAX_BYTES:
        slab, offset = _arena.allocate_slot(max(nbytes, 1), kind)
        return Block(slab.segment, offset, nbytes, slab), False
    return Block(create_segment(nbytes, kind), 0, nbytes), True


def _checked_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(
            f"dtype {dt} holds Python objects, which cannot live in shared memory; "
            "use a numeric, bool or structured dtype without object fields"
        )
    return dt


def _shape_tuple(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        if isinstance(shape, (str, bytes)):
            raise TypeError
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative dimensions, got {dims}")
    return dims


def _new(shape: Any, dtype: Any, order: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A new shared array, and its raw bytes when they may hold old data (else None)."""
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    dims = _shape_tuple(shape)
    dt = _checked_dtype(dtype)
    nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    block, zeroed = _allocate(nbytes)
    raw = np.asarray(block)
    return np.ndarray(dims, dtype=dt, buffer=raw, order=order), None if zeroed else raw


def empty(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    """A new uninitialised array in shared memory (like ``numpy.empty``)."""
    return _new(shape, dtype, order)[0]


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    """A new zero-filled array in shared memory (like ``numpy.zeros``)."""
    arr, dirty = _new(shape, dtype, order)
    if dirty is not None:
        dirty.fill(0)  # bytes, not arr.fill(0): a structured "S3" field would get b"0"
    return arr


def full(shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> np.ndarray:
    """A new array in shared memory filled with ``fill_value`` (like ``numpy.full``)."""
    if dtype is None:
        dtype = np.asarray(fill_value).dtype
    arr = _new(shape, dtype, order)[0]
    arr[...] = fill_value
    return arr


def block_of(arr: np.ndarray) -> Block | None:
    """The shared Block under ``arr``, or None if ``arr`` is not in shared memory."""
    base = arr.base
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, Block) else None


def is_shared(arr: Any) -> bool:
    """Whether ``arr`` is a numpy array (or view) backed by distrib shared memory."""
    return isinstance(arr, np.ndarray) and block_of(arr) is not None


def share(arr: Any) -> np.ndarray:
    """``arr`` in shared memory: the same object if it is shared already, else a copy."""
    if isinstance(arr, np.ndarray) and block_of(arr) is not None:
        return arr
    src = np.asarray(arr)
    order: Any = "F" if src.flags.f_contiguous and not src.flags.c_contiguous else "C"
    contiguous = src.flags.c_contiguous or src.flags.f_contiguous
    if src.nbytes > _arena.ARENA_MAX_BYTES and contiguous:
        _checked_dtype(src.dtype)
        data = src.reshape(-1, order=order).view(np.uint8)
        seg = create_segment(src.nbytes, get_sharing_strategy(), memoryview(data))  # type: ignore[arg-type]
        raw = np.asarray(Block(seg, 0, src.nbytes))
        return np.ndarray(src.shape, dtype=src.dtype, buffer=raw, order=order)
    out = _new(src.shape, src.dtype, order)[0]
    np.copyto(out, src, casting="no")
    return out


class ArrayHandle(NamedTuple):
    """What another process needs to map a shared array: where its memory is, and the view."""

    daemon: str  # address of the cleanup daemon that holds the segment's ticket
    seg_id: str
    kind: str  # sharing strategy: FD (descriptor passed by the daemon) or FS (named file)
    size: int  # segment bytes
    path: str | None  # FS segments: the file to open
    offset: int  # the block's offset in the segment
    nbytes: int  # the block's length
    data_offset: int  # the array's first byte, relative to the block
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype


def handle_of(arr: np.ndarray, block: Block) -> ArrayHandle:
    """The handle that lets another process map ``arr`` (counts one ticket)."""
    seg = block.segment
    address = _client.ref(seg)
    block.handed_out = True
    _blocks.setdefault((seg.seg_id, block.offset), block)
    data_offset = arr.__array_interface__["data"][0] - seg.address - block.offset
    return ArrayHandle(
        address,
        seg.seg_id,
        seg.kind,
        seg.size,
        seg.path,
        block.offset,
        block.nbytes,
        data_offset,
        arr.shape,
        arr.strides,
        arr.dtype,
    )


def rebuild_array(handle: ArrayHandle) -> np.ndarray:
    """Map the memory a handle names (consuming its ticket) and view it as the array."""
    h = handle
    seg_id, offset = h.seg_id, h.offset
    block = _blocks.get((seg_id, offset))
    seg = block.segment if block is not None else cached_segment(seg_id)
    if seg is not None:
        _client.unref(h.daemon, seg_id)
    else:
        fd = _client.take(h.daemon, seg_id)
        seg = open_segment(seg_id, h.kind, h.size, fd, h.path)
        seg.daemon = h.daemon
    if block is None:
        block = Block(seg, offset, h.nbytes)
        block.handed_out = True  # it came from elsewhere: never ours to recycle
        _blocks[(seg_id, offset)] = block
    return np.ndarray(
        h.shape, dtype=h.dtype, buffer=np.asarray(block), offset=h.data_offset, strides=h.strides
    )
