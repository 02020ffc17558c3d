"""A slab allocator for small arrays: many arrays per segment, one fd per slab.

Sharing 100,000 small arrays must not cost 100,000 descriptors and mappings
(torch users hit "Too many open files" and vm.max_map_count). Requests up to
``ARENA_MAX_BYTES`` are rounded up to a power-of-two slot (at least 64 bytes,
so every array is cache-line aligned) carved from a ``SLAB_BYTES`` segment.

Slot lifetime: a slot goes back to its slab's free list only when it never
left this process — not pickled (``Block.handed_out``) and not inherited by a
child (allocated before a fork, tracked by ``fork_epoch``). Another process
may still use a slot that did leave, so such a slot is reclaimed with its whole
slab, when every process has dropped the slab. The allocator keeps a slab
alive while it has live blocks and free slots, plus one idle anonymous slab
per size class as a cache.
"""

from __future__ import annotations

import os
import threading

from ._segment import Segment, create_segment

__all__ = ["ARENA_MAX_BYTES", "SLAB_BYTES", "Slab", "allocate_slot", "fork_epoch"]

# Arrays above 32 KiB get a segment of their own: at that size one mmap per
# array costs little next to the copy, and slots up to 32 KiB waste at most 2x.
ARENA_MAX_BYTES = 32 * 1024
SLAB_BYTES = 1 << 20
_MIN_SLOT = 64


class Slab:
    """One segment cut into equal slots, owned by the process that created it."""

    __slots__ = ("__weakref__", "free", "listed", "live", "owner_pid", "segment", "slot_bytes")

    def __init__(self, segment: Segment, slot_bytes: int) -> None:
        self.segment = segment
        self.slot_bytes = slot_bytes
        self.owner_pid = os.getpid()
        self.free = list(range(segment.size - slot_bytes, -1, -slot_bytes))
        self.live = 0  # blocks of this process in the slab
        self.listed = False  # in the allocator's list (which keeps the slab alive)

    def release(self, offset: int, epoch: int, handed_out: bool) -> None:
        """A block of this slab died: recycle its slot if it never left this process."""
        if self.owner_pid != os.getpid():
            return  # inherited from the parent: not ours to manage
        arena = _arena
        with arena.lock:
            self.live -= 1
            if not handed_out and epoch == arena.epoch:  # not pickled, not forked since
                self.free.append(offset)
            avail = arena.slabs.setdefault((self.segment.kind, self.slot_bytes), [])
            # Keep a slab while it has free slots and live blocks; once idle, keep
            # at most one per class, and never a named one (its file would sit in
            # /dev/shm for the life of the process).
            idle_keep = self.segment.kind != "file_system" and (not avail or avail == [self])
            keep = bool(self.free) and (self.live > 0 or idle_keep)
            if keep and not self.listed:
                avail.append(self)
                self.listed = True
            elif not keep and self.listed:
                avail.remove(self)
                self.listed = False


class _Arena:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (kind, slot_bytes) -> slabs of this process with at least one free slot
        self.slabs: dict[tuple[str, int], list[Slab]] = {}
        self.epoch = 0


_arena = _Arena()


def _before_fork() -> None:
    _arena.epoch += 1  # slots allocated so far may be inherited by the child


def _after_fork_in_child() -> None:
    global _arena
    epoch = _arena.epoch
    _arena = _Arena()  # never allocate from the parent's slabs
    _arena.epoch = epoch


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def fork_epoch() -> int:
    """Counter bumped at every fork; slots remember the value they were allocated at."""
    return _arena.epoch


def slot_bytes_for(nbytes: int) -> int:
    """The slot size serving a request of ``nbytes``."""
    size = _MIN_SLOT
    while size < nbytes:
        size <<= 1
    return size


def allocate_slot(nbytes: int, kind: str) -> tuple[Slab, int]:
    """A free slot of at least ``nbytes`` in a slab of ``kind``: (slab, offset)."""
    slot = slot_bytes_for(nbytes)
    arena = _arena
    with arena.lock:
        avail = arena.slabs.setdefault((kind, slot), [])
        if avail:
            slab = avail[-1]
            offset = slab.free.pop()
            slab.live += 1
            if not slab.free:
                avail.pop()
                slab.listed = False
            return slab, offset
    slab = Slab(create_segment(SLAB_BYTES, kind), slot)  # outside the lock: may be slow
    with arena.lock:
        offset = slab.free.pop()
        slab.live += 1
        if slab.free:
            arena.slabs.setdefault((kind, slot), []).append(slab)
            slab.listed = True
    return slab, offset
