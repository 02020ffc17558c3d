"""The shared segment of one node's ranks: an anonymous memfd nobody can leak.

Lifecycle: the node's first rank creates a ``memfd`` (no name in /dev/shm,
nothing on any filesystem) and publishes ``(pid, fd, nbytes)``; the other
local ranks open ``/proc/<pid>/fd/<fd>`` (allowed for processes of the same
user) and map it. Once everyone has mapped it, each rank closes its descriptor:
the memory lives exactly as long as the last mapping, so a crash, even
``kill -9``, leaves nothing behind.

Layout (offsets identical in every process)::

    [header: PhaseSync words][pad to 4 KiB][slot 0][slot 1] ... [slot n-1]

Slot ``q`` belongs to local rank ``q`` (its only writer) and has two halves,
used by alternate pipeline steps, of ``size * part_bytes`` bytes each.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass

import numpy as np

from ..._errors import ShmError, ShmOutOfMemoryError
from ._sync import header_bytes

__all__ = ["SegmentLayout", "SharedSegment"]

_PAGE = 4096


@dataclass(frozen=True)
class SegmentLayout:
    """Where everything lives inside the segment for ``size`` local ranks."""

    size: int
    part_bytes: int

    @property
    def header_bytes(self) -> int:
        return -(-header_bytes(self.size) // _PAGE) * _PAGE

    @property
    def half_bytes(self) -> int:
        return self.size * self.part_bytes

    @property
    def slot_bytes(self) -> int:
        return 2 * self.half_bytes

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.size * self.slot_bytes

    def slot_offset(self, q: int) -> int:
        return self.header_bytes + q * self.slot_bytes


class SharedSegment:
    """One mapping of the node's segment, plus typed views into its slots."""

    def __init__(self, mm: mmap.mmap, layout: SegmentLayout, fd: int | None) -> None:
        self.layout = layout
        self._mm: mmap.mmap | None = mm
        self._fd = fd  # kept open only until every local rank has mapped it
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        self.header = memoryview(mm)[: layout.header_bytes]
        self.bytes_view = np.frombuffer(mm, dtype=np.uint8)
        self._typed: dict[np.dtype, list[np.ndarray]] = {}

    @classmethod
    def create(cls, layout: SegmentLayout) -> SharedSegment:
        """Create a fresh anonymous segment (the node's first rank)."""
        try:
            fd = os.memfd_create("distrib-shm-engine", os.MFD_CLOEXEC)
        except (AttributeError, OSError) as exc:
            raise ShmError(f"memfd_create failed: {exc}", op="shm_engine.create") from exc
        try:
            os.ftruncate(fd, layout.total_bytes)
            mm = mmap.mmap(fd, layout.total_bytes)
        except OSError as exc:
            os.close(fd)
            raise ShmOutOfMemoryError(
                f"cannot size the shared-memory engine segment to {layout.total_bytes} bytes: "
                f"{exc}",
                op="shm_engine.create",
            ) from exc
        return cls(mm, layout, fd)

    @classmethod
    def attach(cls, pid: int, fd: int, layout: SegmentLayout) -> SharedSegment:
        """Map the segment that process ``pid`` holds open as descriptor ``fd``."""
        path = f"/proc/{pid}/fd/{fd}"
        try:
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ShmError(
                f"cannot open the shared-memory engine segment {path}: {exc}",
                op="shm_engine.attach",
            ) from exc
        try:
            if os.fstat(own).st_size != layout.total_bytes:
                raise ShmError(
                    f"segment {path} has {os.fstat(own).st_size} bytes, expected "
                    f"{layout.total_bytes}",
                    op="shm_engine.attach",
                )
            mm = mmap.mmap(own, layout.total_bytes)
        except BaseException:
            os.close(own)
            raise
        os.close(own)  # the mapping keeps the memory alive
        return cls(mm, layout, None)

    @property
    def fd(self) -> int | None:
        return self._fd

    def release_fd(self) -> None:
        """Close the creator's descriptor once every rank has mapped the segment."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def slots(self, dtype: np.dtype) -> list[np.ndarray]:
        """Per-rank (2, half) arrays of ``dtype`` over the slots (cached per dtype)."""
        views = self._typed.get(dtype)
        if views is None:
            if self._mm is None:
                raise ShmError("the shared-memory engine segment is closed", op="shm_engine")
            lay = self.layout
            per_half = lay.half_bytes // dtype.itemsize
            views = []
            for q in range(lay.size):
                flat = np.frombuffer(
                    self._mm, dtype=dtype, count=2 * per_half, offset=lay.slot_offset(q)
                )
                views.append(flat.reshape(2, per_half))
            self._typed[dtype] = views
        return views

    def close(self) -> None:
        """Drop every view and unmap; idempotent."""
        self.release_fd()
        self._typed.clear()
        self.bytes_view = None  # type: ignore[assignment]
        if self.header is not None:
            self.header.release()
            self.header = None  # type: ignore[assignment]
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a view still exported (e.g. by the sync object): freed by GC
