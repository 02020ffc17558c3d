"""What this machine is: usable cores, cache sizes, memory, CPU model.

Algorithm choices (where one shared-memory all-reduce gives way to another,
whether a waiting rank spins) follow from these numbers rather than from
constants tuned on one CPU, and ``distrib-bench`` prints them above its tables.
Every reader has a fallback, so nothing here fails on an unusual system:

* caches of cpu0: ``/sys/devices/system/cpu/cpu0/cache/index*/`` (data and
  unified caches by level), else ``lscpu -C -B``, else ``os.sysconf``, else
  ``DEFAULT_L2`` and ``DEFAULT_LLC``; ``Machine.cache_source`` says which;
* physical memory: ``os.sysconf`` (else ``/proc/meminfo``), lowered to a
  cgroup memory limit when one is set;
* usable cores: ``os.sched_getaffinity(0)``, the cores this process may run on;
* the CPU model: ``/proc/cpuinfo``, else ``platform``.
"""

from __future__ import annotations

import enum
import functools
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "DEFAULT_L2",
    "DEFAULT_LLC",
    "CacheSource",
    "Caches",
    "Machine",
    "cpu_model",
    "machine",
    "physical_memory",
    "read_caches",
    "usable_cores",
]

# When no cache size can be read: a common server last-level cache and L2.
DEFAULT_LLC = 32 << 20
DEFAULT_L2 = 1 << 20
SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


class CacheSource(enum.Enum):
    """Where the cache sizes came from."""

    SYSFS = "sysfs"
    LSCPU = "lscpu"
    SYSCONF = "sysconf"
    DEFAULT = "default"


class Caches(NamedTuple):
    """cpu0's data and unified caches: bytes by level, and where they were read."""

    levels: dict[int, int]
    source: CacheSource

    @property
    def llc_level(self) -> int:
        return max(self.levels) if self.levels else 0

    @property
    def llc(self) -> int:
        return self.levels[self.llc_level] if self.levels else DEFAULT_LLC

    @property
    def l2(self) -> int:
        return self.levels.get(2, min(self.llc, DEFAULT_L2))


class Machine(NamedTuple):
    """The properties of this machine that distrib's choices depend on."""

    cpu_model: str
    usable_cores: int  # os.sched_getaffinity: what this process may run on
    l2_bytes: int  # per core
    llc_bytes: int  # last-level cache, shared
    llc_level: int  # 0 when unknown
    cache_source: CacheSource
    memory_bytes: int  # physical memory or the cgroup limit (0: unknown)

    def describe(self) -> str:
        """One line for the header of a benchmark table."""
        level = f"L{self.llc_level}, " if self.llc_level else ""
        memory = f", {self.memory_bytes / (1 << 30):.1f} GiB memory" if self.memory_bytes else ""
        return (
            f"{self.cpu_model}, {self.usable_cores} usable cores, L2 {self.l2_bytes >> 10} KiB, "
            f"last-level cache {self.llc_bytes >> 20} MiB ({level}{self.cache_source.value})"
            f"{memory}"
        )

    def ranks_per_core(self, local_ranks: int) -> float:
        """How many of ``local_ranks`` processes share each usable core."""
        return local_ranks / max(1, self.usable_cores)


def _parse_bytes(text: str) -> int:
    """``32768K`` -> 33554432; ``2M``, ``1G``, ``4096``. ValueError if unreadable."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(t[:-1] if t[-1:] in "KMG" else t) * scale


def _from_sysfs(root: Path) -> dict[int, int]:
    levels: dict[int, int] = {}
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _parse_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Unified", "Data") and size > 0:
            levels[level] = max(levels.get(level, 0), size)
    return levels


def _from_lscpu() -> dict[int, int]:
    exe = shutil.which("lscpu")
    if exe is None:
        return {}
    try:
        out = subprocess.run(
            [exe, "-C", "-B"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = out.splitlines()
    if not lines:
        return {}
    head = lines[0].split()
    try:
        one, typ, lev = head.index("ONE-SIZE"), head.index("TYPE"), head.index("LEVEL")
    except ValueError:
        return {}
    levels: dict[int, int] = {}
    for line in lines[1:]:
        cols = line.split()
        try:
            level, kind, size = int(cols[lev]), cols[typ], _parse_bytes(cols[one])
        except (IndexError, ValueError):
            continue
        if kind in ("Unified", "Data") and size > 0:
            levels[level] = max(levels.get(level, 0), size)
    return levels


def _from_sysconf() -> dict[int, int]:
    levels: dict[int, int] = {}
    for level in (2, 3, 4):
        name = f"SC_LEVEL{level}_CACHE_SIZE"
        if name in os.sysconf_names:
            try:
                size = os.sysconf(name)
            except (OSError, ValueError):
                continue
            if size > 0:
                levels[level] = size
    return levels


def read_caches(sysfs_root: Path = SYSFS_CACHE) -> Caches:
    """cpu0's caches: sysfs, else lscpu, else sysconf, else the defaults."""
    for source, read in (
        (CacheSource.SYSFS, lambda: _from_sysfs(sysfs_root)),
        (CacheSource.LSCPU, _from_lscpu),
        (CacheSource.SYSCONF, _from_sysconf),
    ):
        levels = read()
        if levels:
            return Caches(levels, source)
    return Caches({}, CacheSource.DEFAULT)


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


def usable_cores() -> int:
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


@functools.lru_cache(maxsize=1)
def machine() -> Machine:
    """This machine (read once per process)."""
    caches = read_caches()
    return Machine(
        cpu_model(),
        usable_cores(),
        caches.l2,
        caches.llc,
        caches.llc_level,
        caches.source,
        physical_memory(),
    )
