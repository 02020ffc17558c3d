"""Buffers that live in file-backed shared memory, and local peers' views of them.

A process can *expose* a memory range that is a ``MAP_SHARED`` mapping of a
file it holds open (a torch storage moved into shared memory, ``distrib.torch``
does this for tensors it reduces again and again, such as DDP's gradient
buckets). Large all-reduces whose every rank passes an exposed buffer then
skip the segment entirely: each rank maps its peers' files read-only through
``/proc/<pid>/fd/<fd>`` (the same permission as ``process_vm_readv``, probed at
rendezvous) and reads their buffers with plain loads (``_reduce``).

``ExposedBuffers`` is the process's registry (``exposed``); ``PeerMappings``
is one group's cache of its peers' files, keyed by (pid, fd, inode): a peer's
freed storage closes its fd, and a new file on the same fd has another inode,
so a stale mapping is never read and is unmapped when the fd shows up again.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import threading
import time
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

from ..._errors import ShmError

__all__ = ["ExposedBuffers", "Handle", "PeerMappings", "exposed"]


class Handle(NamedTuple):
    """Where a buffer lives: file descriptor ``fd`` (in its owner) of the file
    with inode ``inode``, at byte ``offset`` of that file."""

    fd: int
    inode: int
    offset: int


class _Range(NamedTuple):
    addr: int
    nbytes: int
    fd: int
    inode: int


class ExposedBuffers:
    """Memory ranges of this process that are shared mappings of open files.

    ``remove`` runs from a storage's finalizer, which the garbage collector may
    call on any thread at any allocation, also one made while this thread holds
    the lock: so it takes no lock and only queues the address; ``add`` and
    ``find`` drop the queued ranges first, under the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._ranges: list[_Range] = []
        self._gone: list[int] = []  # addresses of freed ranges (list.append is atomic)

    def add(self, addr: int, nbytes: int, fd: int) -> None:
        """Expose ``nbytes`` at ``addr``, the start of a shared mapping of ``fd``."""
        rng = _Range(addr, nbytes, fd, os.fstat(fd).st_ino)
        with self._lock:
            self._purge()
            self._drop(addr)
            i = bisect.bisect(self._starts, addr)
            self._starts.insert(i, addr)
            self._ranges.insert(i, rng)

    def remove(self, addr: int) -> None:
        """Forget the range starting at ``addr`` (its memory is about to go)."""
        self._gone.append(addr)

    def _purge(self) -> None:
        while self._gone:
            self._drop(self._gone.pop())

    def _drop(self, addr: int) -> None:
        i = bisect.bisect_left(self._starts, addr)
        if i < len(self._starts) and self._starts[i] == addr:
            del self._starts[i]
            del self._ranges[i]

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._ranges)

    def find(self, buf: np.ndarray) -> Handle | None:
        """The handle of contiguous ``buf`` when it lies inside an exposed range."""
        if not self._ranges or not buf.flags.c_contiguous:
            return None
        addr = buf.ctypes.data
        with self._lock:
            self._purge()
            i = bisect.bisect(self._starts, addr) - 1
            if i < 0:
                return None
            rng = self._ranges[i]
        if addr + buf.nbytes > rng.addr + rng.nbytes:
            return None
        try:  # the fd must still be that file (its storage is alive)
            if os.fstat(rng.fd).st_ino != rng.inode:
                return None
        except OSError:
            return None
        return Handle(rng.fd, rng.inode, addr - rng.addr)


exposed = ExposedBuffers()

# Peers' files mapped at once per group: DDP keeps one bucket per 25 MiB of
# gradients, so this covers models of several GiB; beyond, the oldest go.
_MAX_MAPPINGS = 256
# How often the mappings are checked against the peers' open files: a peer's
# freed bucket closes its fd, and our mapping alone would keep its memory.
_SWEEP_S = 1.0


class _Mapping(NamedTuple):
    addr: int
    length: int


def _load_libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_libc = _load_libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


class PeerMappings:
    """Read-only mappings of local peers' exposed files, cached across calls.

    Mapped with libc's ``mmap`` rather than Python's, which keeps a duplicate of
    the file descriptor for as long as the mapping lives: a model of many buckets
    would otherwise hold one descriptor per bucket and peer. Views of a mapping
    are only used inside the all-reduce that made them.
    """

    def __init__(self) -> None:
        self._maps: OrderedDict[tuple[int, int, int], _Mapping] = OrderedDict()
        self._swept = time.monotonic()

    def __len__(self) -> int:
        return len(self._maps)

    def view(self, pid: int, handle: Handle, dtype: np.dtype, count: int) -> np.ndarray:
        """``count`` items of ``dtype`` at ``handle`` in process ``pid`` (read-only)."""
        key = (pid, handle.fd, handle.inode)
        got = self._maps.get(key)
        if got is None:
            self.sweep()  # a new file: maybe older ones were freed (a model replaced)
            got = self._map(pid, handle)
            self._maps[key] = got
            while len(self._maps) > _MAX_MAPPINGS:
                self._unmap(self._maps.popitem(last=False)[1])
        else:
            self._maps.move_to_end(key)
        end = handle.offset + count * dtype.itemsize
        if end > got.length:
            raise ShmError(
                f"pid {pid}'s shared buffer is {got.length} bytes, not the {end} its "
                "all-reduce needs",
                op="all_reduce",
            )
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * got.length).from_address(got.addr))
        raw.flags.writeable = False
        return raw[handle.offset : end].view(dtype)

    def maybe_sweep(self) -> None:
        """``sweep`` when the last one is ``_SWEEP_S`` old (every large all-reduce asks)."""
        now = time.monotonic()
        if now - self._swept >= _SWEEP_S:
            self._swept = now
            self.sweep()

    def sweep(self) -> None:
        """Unmap every peer file that its owner no longer holds open (freed)."""
        for key in list(self._maps):
            pid, fd, inode = key
            try:
                alive = os.stat(f"/proc/{pid}/fd/{fd}").st_ino == inode
            except OSError:
                alive = False
            if not alive:
                self._unmap(self._maps.pop(key))

    def _map(self, pid: int, handle: Handle) -> _Mapping:
        # A file that replaced an earlier one on the same fd: the old one is gone.
        for old in [k for k in self._maps if k[0] == pid and k[1] == handle.fd]:
            self._unmap(self._maps.pop(old))
        path = f"/proc/{pid}/fd/{handle.fd}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ShmError(f"cannot open pid {pid}'s shared buffer ({path}): {exc}") from exc
        try:
            st = os.fstat(fd)
            if st.st_ino != handle.inode:
                raise ShmError(
                    f"pid {pid}'s fd {handle.fd} is no longer the shared buffer it published"
                )
            addr = _libc.mmap(None, st.st_size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == _MAP_FAILED:
                err = ctypes.get_errno()
                raise ShmError(f"cannot map pid {pid}'s shared buffer: {os.strerror(err)}")
        finally:
            os.close(fd)
        return _Mapping(addr, st.st_size)

    @staticmethod
    def _unmap(m: _Mapping) -> None:
        _libc.munmap(m.addr, m.length)

    def close(self) -> None:
        """Unmap every peer file."""
        while self._maps:
            self._unmap(self._maps.popitem()[1])
