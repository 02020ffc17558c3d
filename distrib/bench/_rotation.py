"""How many buffer sets each ``distrib-bench`` rank rotates through.

Buffer rotation: a benchmark that calls a collective on the same buffer again
and again finds its data in the cache, which flatters every library and says
nothing about a training step whose gradients were last touched long ago. With
``--buffers rotate`` (the default) every rank cycles through ``k`` buffer sets
(everything one call touches), where ``k = rotation_count(...)``: enough sets
that together they hold at least ``2 x LLC``, no more than fit in the memory
budget of ``physical memory / 8 / world`` bytes per rank (so 256 MiB messages
do not exhaust memory), and always at least one.

The machine itself (cache, memory, cores) is read by ``distrib._machine``.
"""

from __future__ import annotations

import enum
import math

import numpy as np

__all__ = ["BufferMode", "footprint", "memory_budget", "rotation_count"]

# Ops whose nccl-tests size is the gathered (large) buffer and that also touch one block.
_BLOCKED = ("all_gather", "reduce_scatter", "gather", "scatter")


class BufferMode(enum.Enum):
    """``--buffers``: cycle through enough buffers to leave the cache, or reuse one."""

    ROTATE = "rotate"
    SAME = "same"


def memory_budget(memory: int, world: int) -> int:
    """Bytes one rank may spend on rotating buffers: physical memory / 8 / ranks."""
    return memory // 8 // max(1, world)


def rotation_count(set_bytes: int, llc: int, memory: int, world: int) -> int:
    """Buffer sets one rank cycles through so that they hold >= ``2 x llc`` bytes.

    ``ceil(2 x llc / set_bytes)`` sets, but no more than fit in
    ``memory_budget(memory, world)``, and never fewer than one (a message larger
    than the budget still runs, on one set).
    """
    if set_bytes <= 0:
        return 1
    wanted = math.ceil(2 * llc / set_bytes)
    allowed = memory_budget(memory, world) // set_bytes
    return max(1, min(wanted, allowed))


def footprint(op: str, nbytes: int, n: int, dtype: str) -> int:
    """Bytes of the arrays one call of ``op`` touches on a rank (one buffer set).

    ``nbytes`` is nccl-tests' size. The same figure sizes the rotation for
    distrib, gloo and mpi4py, so all three leave the cache alike.
    """
    if op == "barrier":
        return 0
    itemsize = np.dtype(dtype).itemsize
    count = max(1, nbytes // itemsize)
    if op in _BLOCKED:
        block = max(1, count // n)
        return (block * n + block) * itemsize
    if op == "all_to_all":
        return 2 * max(1, count // n) * n * itemsize
    return count * itemsize
