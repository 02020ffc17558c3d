"""What ``distrib-bench`` needs to know about the machine, and how many buffers each rank rotates.

Read, never assumed for one CPU:

* the last-level cache of cpu0: ``/sys/devices/system/cpu/cpu0/cache/index*/``
  (the highest ``level`` whose ``type`` is ``Unified`` or ``Data``), else
  ``lscpu -C -B``, else ``os.sysconf`` (where Python exposes the cache names),
  else ``DEFAULT_LLC_BYTES`` (32 MiB), and the header says which source it came from;
* physical memory: ``os.sysconf`` pages x page size, lowered to a cgroup
  memory limit when one is set;
* logical cores: ``os.sched_getaffinity(0)`` (the cores this process may run on);
* the CPU model: ``/proc/cpuinfo``, else ``platform.processor()``.

Buffer rotation: a benchmark that calls a collective on the same buffer again
and again finds its data in the cache, which flatters every library and says
nothing about a training step whose gradients were last touched long ago. With
``--buffers rotate`` (the default) every rank cycles through ``k`` buffer sets
(everything one call touches), where ``k = rotation_count(...)``: enough sets
that together they hold at least ``2 x LLC``, no more than fit in the memory
budget of ``physical memory / 8 / world`` bytes per rank (so 256 MiB messages
do not exhaust memory), and always at least one.
"""

from __future__ import annotations

import enum
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_LLC_BYTES",
    "BufferMode",
    "CacheInfo",
    "CacheSource",
    "cpu_model",
    "footprint",
    "last_level_cache",
    "logical_cores",
    "memory_budget",
    "physical_memory",
    "rotation_count",
]

#: Used when no cache size can be read: a common last-level cache of today's server CPUs.
DEFAULT_LLC_BYTES = 32 << 20

SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")

# Ops whose nccl-tests size is the gathered (large) buffer and that also touch one block.
_BLOCKED = ("all_gather", "reduce_scatter", "gather", "scatter")


class BufferMode(enum.Enum):
    """``--buffers``: cycle through enough buffers to leave the cache, or reuse one."""

    ROTATE = "rotate"
    SAME = "same"


class CacheSource(enum.Enum):
    """Where the last-level cache size came from."""

    SYSFS = "sysfs"
    LSCPU = "lscpu"
    SYSCONF = "sysconf"
    DEFAULT = "default"


@dataclass(frozen=True)
class CacheInfo:
    """The last-level cache of cpu0: size in bytes, level (0 when unknown), where it was read."""

    size: int
    level: int
    source: CacheSource


def _parse_bytes(text: str) -> int:
    """``32768K`` -> 33554432; ``2M``, ``1G``, plain byte counts. ValueError if unreadable."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMG" else t
    return int(digits) * mult


def _from_sysfs(root: Path) -> CacheInfo | None:
    best: CacheInfo | None = None
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _parse_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Unified", "Data") and size > 0 and (best is None or level > best.level):
            best = CacheInfo(size, level, CacheSource.SYSFS)
    return best


def _from_lscpu() -> CacheInfo | None:
    exe = shutil.which("lscpu")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "-C", "-B"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.splitlines()
    if not lines:
        return None
    head = lines[0].split()
    try:
        one, typ, lev = head.index("ONE-SIZE"), head.index("TYPE"), head.index("LEVEL")
    except ValueError:
        return None
    best: CacheInfo | None = None
    for line in lines[1:]:
        cols = line.split()
        try:
            level, kind, size = int(cols[lev]), cols[typ], _parse_bytes(cols[one])
        except (IndexError, ValueError):
            continue
        if kind in ("Unified", "Data") and size > 0 and (best is None or level > best.level):
            best = CacheInfo(size, level, CacheSource.LSCPU)
    return best


def _from_sysconf() -> CacheInfo | None:
    for level in (4, 3, 2):
        name = f"SC_LEVEL{level}_CACHE_SIZE"
        if name in os.sysconf_names:
            try:
                size = os.sysconf(name)
            except (OSError, ValueError):
                continue
            if size > 0:
                return CacheInfo(size, level, CacheSource.SYSCONF)
    return None


def last_level_cache(sysfs_root: Path = SYSFS_CACHE) -> CacheInfo:
    """cpu0's last-level cache: sysfs, else lscpu, else sysconf, else ``DEFAULT_LLC_BYTES``."""
    for found in (_from_sysfs(sysfs_root), _from_lscpu(), _from_sysconf()):
        if found is not None:
            return found
    return CacheInfo(DEFAULT_LLC_BYTES, 0, CacheSource.DEFAULT)


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def physical_memory() -> int:
    """Bytes of physical memory, or the cgroup memory limit when that is lower."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        total = 0
    if total <= 0:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            total = 0
    limit = _cgroup_limit()
    if limit is not None and (total <= 0 or limit < total):
        total = limit
    return total


def logical_cores() -> int:
    """The logical cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name, as the kernel reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model Name")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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
