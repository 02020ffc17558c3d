"""Shared-memory segments: one memfd or named file, mapped once per process.

Two kinds, one per sharing strategy:

- ``file_descriptor``: an anonymous ``memfd`` (never a name in ``/dev/shm``);
  it travels between processes as a file descriptor through the cleanup daemon
  (``_client.py``). The kernel frees it when the last descriptor and mapping go.
- ``file_system``: a file in ``DISTRIB_SHM_DIR`` (default ``/dev/shm``) that any
  process can open by path; the daemon unlinks it when its users are gone.

Pages are reserved with ``posix_fallocate`` at creation, so running out of
memory is a ShmOutOfMemoryError here and never a SIGBUS on first touch.
A ``Segment`` keeps its descriptor open for its whole life: a forked child that
inherits the mapping can then hand the segment on even after its parent is gone.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import weakref

import numpy as np

from .._config import config
from .._errors import ShmError, ShmFdLimitError
from . import _limits

__all__ = [
    "FD",
    "FS",
    "Segment",
    "attach_process_segment",
    "cached_segment",
    "create_segment",
    "open_segment",
]

FD = "file_descriptor"
FS = "file_system"
_DEFAULT_DIR = "/dev/shm"

# seg_id -> Segment mapped in this process (the receiver-side cache). Inherited
# across fork on purpose: the child inherits the mappings too.
_segments: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()


class Segment:
    """One shared-memory object mapped into this process."""

    def __init__(self, seg_id: str, kind: str, size: int, fd: int, path: str | None) -> None:
        self.seg_id = seg_id
        self.kind = kind
        self.size = size
        self.path = path
        self.fd = fd
        self.daemon: str | None = None  # address of the daemon that knows this segment
        try:
            mm = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # Python's mmap keeps a duplicate of the descriptor: at the open-file
                # limit that duplicate is what fails, on the creating side too.
                raise _fd_limit_error(f"mapping shared-memory segment {seg_id}") from exc
            raise ShmError(
                f"cannot map shared-memory segment {seg_id} ({size} bytes): {exc}", op="shm.map"
            ) from exc
        # The uint8 view pins the mapping (an exported buffer blocks mmap.close)
        # and gives the base address that blocks and handles are relative to.
        self.buffer = np.frombuffer(mm, np.uint8)
        self.address: int = self.buffer.__array_interface__["data"][0]
        _segments[seg_id] = self
        weakref.finalize(self, _on_segment_gone, seg_id, fd).atexit = False


def _on_segment_gone(seg_id: str, fd: int) -> None:
    from . import _client  # lazy: _client imports this module

    try:
        os.close(fd)
    except OSError:
        pass
    _client.release(seg_id)


def cached_segment(seg_id: str) -> Segment | None:
    """The segment ``seg_id`` if this process has it mapped already."""
    return _segments.get(seg_id)


def _fd_limit_error(what: str) -> ShmFdLimitError:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return ShmFdLimitError(
        f"process {os.getpid()} is out of file descriptors while {what} "
        f"(RLIMIT_NOFILE soft={soft}, hard={hard}); raise the limit (ulimit -n) or "
        "free shared arrays you no longer need",
        op="shm.alloc",
    )


def create_segment(
    size: int, kind: str, data: memoryview | None = None, *, reserve: bool = True
) -> Segment:
    """Create and map a new segment of ``size`` bytes with its pages reserved.

    ``reserve=False`` (anonymous segments only) sizes the segment without
    allocating its pages: for scratch space that may stay mostly untouched,
    such as the collective engine's per-rank slots.

    With ``data`` (``size`` bytes), the segment is filled by ``pwrite`` instead
    of ``fallocate`` + copy: tmpfs does not zero pages that a write fills, so
    this is one pass over memory instead of two (measured 64 MiB: ~90 ms vs
    ~170 ms here). Either way every page exists before this returns.

    Raises:
        ShmOutOfMemoryError: the memory (or the named directory) lacks ``size`` bytes.
        ShmFdLimitError: this process is at its open-file limit.
    """
    _limits.raise_fd_soft_limit()
    seg_id = secrets.token_hex(12)
    if kind == FD:
        _limits.check_anonymous_space(size)
        try:
            fd = os.memfd_create(f"distrib-{seg_id}", os.MFD_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _fd_limit_error("creating a shared-memory segment") from exc
            raise ShmError(f"memfd_create failed: {exc}", op="shm.alloc") from exc
        try:
            if reserve:
                _reserve(fd, size, data)
            else:
                os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise _limits.anonymous_oom(size, None) from exc
            raise ShmError(
                f"cannot reserve {size} bytes of shared memory: {exc}", op="shm.alloc"
            ) from exc
        return Segment(seg_id, kind, size, fd, None)
    if kind != FS:
        raise ValueError(f"unknown sharing strategy {kind!r}; expected {FD!r} or {FS!r}")
    from . import _client

    directory = config().shm_dir or _DEFAULT_DIR
    _limits.check_named_space(size, directory)
    path = os.path.join(directory, f"distrib_{os.getpid()}_{seg_id}")
    # Name the file to the daemon before it exists: a kill -9 at any point after
    # the open below then leaves nothing behind (the daemon unlinks the path once
    # this process is gone, and ignores a path that was never created).
    daemon = _client.track(seg_id, path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        _client.forget(seg_id)  # the name was not made here: the daemon must not unlink it
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _fd_limit_error("creating a shared-memory segment") from exc
        raise ShmError(f"cannot create shared-memory file {path}: {exc}", op="shm.alloc") from exc
    try:
        _reserve(fd, size, data)
    except BaseException as exc:
        os.close(fd)
        _unlink_quietly(path)
        _client.release(seg_id)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise _limits.named_oom(size, directory) from exc
        raise
    try:
        seg = Segment(seg_id, kind, size, fd, path)  # closes fd if it cannot map
    except BaseException:
        _unlink_quietly(path)  # nothing maps it: the name must not outlive this call
        _client.release(seg_id)
        raise
    seg.daemon = daemon
    return seg


def _reserve(fd: int, size: int, data: memoryview | None) -> None:
    """Give the file ``size`` bytes of real pages (ENOSPC/ENOMEM now, never SIGBUS later)."""
    if data is None:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
        return
    done = 0
    while done < size:  # one write moves at most ~2 GiB
        done += os.pwrite(fd, data[done:], done)


def open_segment(seg_id: str, kind: str, size: int, fd: int | None, path: str | None) -> Segment:
    """Map a segment received from another process (``fd`` is ours to keep)."""
    if kind == FS:
        if path is None:
            raise ShmError(f"segment {seg_id} arrived without a path", op="shm.attach")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _fd_limit_error(f"opening shared-memory file {path}") from exc
            raise ShmError(
                f"cannot open shared-memory file {path}: {exc} (its users are gone and the "
                "cleanup daemon removed it?)",
                op="shm.attach",
            ) from exc
    if fd is None:
        raise ShmError(f"segment {seg_id} arrived without a descriptor", op="shm.attach")
    return Segment(seg_id, kind, size, fd, path)


def attach_process_segment(pid: int, fd: int, size: int) -> Segment:
    """Map the anonymous segment that process ``pid`` (same user) holds as descriptor ``fd``.

    For processes that meet through a store rather than a queue: the creator
    publishes ``(pid, fd)`` and peers open ``/proc/<pid>/fd/<fd>``.
    """
    path = f"/proc/{pid}/fd/{fd}"
    try:
        own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _fd_limit_error(f"opening {path}") from exc
        raise ShmError(f"cannot open shared-memory segment {path}: {exc}", op="shm.attach") from exc
    actual = os.fstat(own).st_size
    if actual != size:
        os.close(own)
        raise ShmError(f"segment {path} has {actual} bytes, expected {size}", op="shm.attach")
    return Segment(f"proc-{pid}-{fd}-{secrets.token_hex(4)}", FD, size, own, None)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
