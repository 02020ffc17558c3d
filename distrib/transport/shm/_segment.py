"""The shared segment of one node's ranks: an anonymous memfd nobody can leak.

Lifecycle: the node's first rank creates an anonymous ``distrib.shm`` segment
(a ``memfd``: no name in /dev/shm, nothing on any filesystem) and publishes
``(pid, fd, nbytes)``; the other local ranks open ``/proc/<pid>/fd/<fd>``
(allowed for processes of the same user) and map it. The memory lives as long
as the last process that maps it, so a crash, even ``kill -9``, leaves nothing
behind.

Layout (offsets identical in every process)::

    [header: PhaseSync words][pad to 4 KiB][slot 0][slot 1] ... [slot n-1]

Slot ``q`` belongs to local rank ``q`` (its only writer) and has two halves,
used by alternate pipeline steps, of ``size * part_bytes`` bytes each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..._errors import ShmError
from ...shm._segment import FD, Segment, attach_process_segment, create_segment
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
    """The node's segment as the engine sees it: a header and typed views of the slots."""

    def __init__(self, segment: Segment, layout: SegmentLayout) -> None:
        self.layout = layout
        self._segment: Segment | None = segment
        self.addr = segment.address
        self.header = memoryview(segment.buffer.data)[: layout.header_bytes]
        self.bytes_view = segment.buffer
        self._typed: dict[np.dtype, list[np.ndarray]] = {}

    @classmethod
    def create(cls, layout: SegmentLayout) -> SharedSegment:
        """Create a fresh anonymous segment (the node's first rank); pages come on first use."""
        return cls(create_segment(layout.total_bytes, FD, reserve=False), layout)

    @classmethod
    def attach(cls, pid: int, fd: int, layout: SegmentLayout) -> SharedSegment:
        """Map the segment that process ``pid`` holds open as descriptor ``fd``."""
        return cls(attach_process_segment(pid, fd, layout.total_bytes), layout)

    @property
    def fd(self) -> int | None:
        """The descriptor peers open through ``/proc`` (``None`` once closed)."""
        return None if self._segment is None else self._segment.fd

    def slots(self, dtype: np.dtype) -> list[np.ndarray]:
        """Per-rank (2, half) arrays of ``dtype`` over the slots (cached per dtype)."""
        views = self._typed.get(dtype)
        if views is None:
            if self._segment is None:
                raise ShmError("the shared-memory engine segment is closed", op="shm_engine")
            lay = self.layout
            per_half = lay.half_bytes // dtype.itemsize
            views = []
            for q in range(lay.size):
                flat = np.frombuffer(
                    self._segment.buffer, dtype=dtype, count=2 * per_half, offset=lay.slot_offset(q)
                )
                views.append(flat.reshape(2, per_half))
            self._typed[dtype] = views
        return views

    def close(self) -> None:
        """Drop every view; the mapping goes with the last reference. Idempotent."""
        self._typed.clear()
        self.bytes_view = None  # type: ignore[assignment]
        if self.header is not None:
            self.header.release()
            self.header = None  # type: ignore[assignment]
        self._segment = None
