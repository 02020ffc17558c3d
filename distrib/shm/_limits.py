"""Resource limits that shared memory runs into: open files and free memory.

Checked before allocating so that running out is a clear error at allocation,
never a SIGBUS or an OOM kill on first touch later.
"""

from __future__ import annotations

import os
import resource

from .._errors import ShmOutOfMemoryError

__all__ = ["check_anonymous_space", "check_named_space", "raise_fd_soft_limit"]

_raised_for_pid: int | None = None


def raise_fd_soft_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, once per process.

    Shared memory travels as file descriptors; the common soft limit of 1024 is
    what makes torch users hit "Too many open files".
    """
    global _raised_for_pid
    if _raised_for_pid == os.getpid():
        return
    _raised_for_pid = os.getpid()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # the kernel's nr_open default; RLIM_INFINITY is refused
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; ShmFdLimitError reports it if it is hit


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _fmt(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


# Below this, reading /proc/meminfo (~50 us) costs more than it can save: the
# allocation itself still fails with ENOMEM/ENOSPC when memory is really gone.
_CHECK_FROM_BYTES = 16 << 20


def check_anonymous_space(nbytes: int) -> None:
    """Raise ShmOutOfMemoryError if ``nbytes`` exceeds the memory available now."""
    if nbytes < _CHECK_FROM_BYTES:
        return
    available = _meminfo_bytes("MemAvailable")
    if available is None:
        return
    available += _meminfo_bytes("SwapFree") or 0
    if nbytes > available:
        raise anonymous_oom(nbytes, available)


def anonymous_oom(nbytes: int, available: int | None) -> ShmOutOfMemoryError:
    """The error for anonymous shared memory that cannot be reserved."""
    if available is None:
        available = (_meminfo_bytes("MemAvailable") or 0) + (_meminfo_bytes("SwapFree") or 0)
    return ShmOutOfMemoryError(
        f"cannot allocate {nbytes} bytes ({_fmt(nbytes)}) of anonymous shared memory: "
        f"only {available} bytes ({_fmt(available)}) of memory are available; "
        "free memory or allocate less",
        op="shm.alloc",
    )


def named_oom(nbytes: int, directory: str) -> ShmOutOfMemoryError:
    """The error for a named segment that does not fit in ``directory``."""
    try:
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = 0
    return ShmOutOfMemoryError(
        f"cannot allocate {nbytes} bytes ({_fmt(nbytes)}) of shared memory in {directory}: "
        f"only {free} bytes ({_fmt(free)}) free there. Fix: give the container more "
        "shared memory (docker run --shm-size=8g, or --ipc=host), or point "
        "DISTRIB_SHM_DIR at a bigger tmpfs, or use the file_descriptor sharing strategy",
        op="shm.alloc",
    )


def check_named_space(nbytes: int, directory: str) -> None:
    """Raise ShmOutOfMemoryError if ``directory``'s filesystem has less than ``nbytes`` free."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    if nbytes > st.f_bavail * st.f_frsize:
        raise named_oom(nbytes, directory)
