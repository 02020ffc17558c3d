"""What this machine is: usable cores, cache sizes, memory, CPU model.

Algorithm choices (where one shared-memory all-reduce gives way to another,
whether a waiting rank spins) follow from these numbers rather than from
constants tuned on one CPU, and ``distrib-bench`` prints them above its tables.
Every reader has a fallback, so nothing here fails on an unusual system.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

__all__ = ["Machine", "machine"]

# When the cache sizes cannot be read: a common server last-level cache and L2.
_DEFAULT_LLC = 32 << 20
_DEFAULT_L2 = 1 << 20
_CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"


class Machine(NamedTuple):
    """The properties of this machine that distrib's choices depend on."""

    cpu_model: str
    usable_cores: int  # os.sched_getaffinity: what this process may run on
    l2_bytes: int  # per core
    llc_bytes: int  # last-level cache, shared
    memory_bytes: int  # physical memory (0: unknown)
    caches_measured: bool  # False: the cache sizes are the defaults above

    def describe(self) -> str:
        """One line for the header of a benchmark table."""
        caches = "" if self.caches_measured else " (not readable: defaults)"
        memory = f", {self.memory_bytes / (1 << 30):.1f} GiB memory" if self.memory_bytes else ""
        return (
            f"{self.cpu_model}, {self.usable_cores} usable cores, L2 {self.l2_bytes >> 10} KiB, "
            f"last-level cache {self.llc_bytes >> 20} MiB{caches}{memory}"
        )

    def ranks_per_core(self, local_ranks: int) -> float:
        """How many of ``local_ranks`` processes share each usable core."""
        return local_ranks / max(1, self.usable_cores)


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale


def _caches() -> tuple[int, int, bool]:
    """(L2 bytes, last-level bytes, read from sysfs) of cpu0's data/unified caches."""
    levels: dict[int, int] = {}
    try:
        for entry in os.listdir(_CACHE_DIR):
            if not entry.startswith("index"):
                continue
            base = os.path.join(_CACHE_DIR, entry)
            with open(os.path.join(base, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(base, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, "size")) as f:
                levels[level] = max(levels.get(level, 0), _size(f.read()))
    except (OSError, ValueError):
        levels = {}
    if not levels:
        return _DEFAULT_L2, _DEFAULT_LLC, False
    llc = levels[max(levels)]
    return levels.get(2, min(llc, _DEFAULT_L2)), llc, True


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 0


@functools.lru_cache(maxsize=1)
def machine() -> Machine:
    """This machine (read once per process)."""
    l2, llc, measured = _caches()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return Machine(_cpu_model(), cores, l2, llc, _memory(), measured)
