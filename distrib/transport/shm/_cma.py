"""Single-copy reads from a peer's memory: ``process_vm_readv`` (cross-memory attach).

Large all-reduces read the peers' *own* buffers directly instead of staging
them through the shared segment: one copy instead of two, as Open MPI's
shared-memory transport does with CMA. The kernel allows it between
processes of the same user that may ptrace each other; where it does not
(a seccomp profile, Yama scope 2+), ``probe`` fails and the engine keeps
the staged path. Only local ranks of one group, which run our code, are read.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

from ..._errors import ShmError

__all__ = ["RemoteReader", "available"]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _load() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    return fn


_readv = _load()


def available() -> bool:
    """Whether this libc exposes ``process_vm_readv``."""
    return _readv is not None


class RemoteReader:
    """Copies ranges of other processes' memory into local numpy buffers."""

    def __init__(self) -> None:
        self._local = _IoVec()
        self._remote = _IoVec()
        self._local_p = ctypes.pointer(self._local)
        self._remote_p = ctypes.pointer(self._remote)

    def read(self, pid: int, remote_addr: int, dst_addr: int, nbytes: int) -> None:
        """Copy ``nbytes`` at ``remote_addr`` in process ``pid`` to ``dst_addr`` here."""
        if _readv is None:
            raise ShmError("process_vm_readv is unavailable", op="shm_engine.read")
        done = 0
        while done < nbytes:
            self._local.iov_base = dst_addr + done
            self._local.iov_len = nbytes - done
            self._remote.iov_base = remote_addr + done
            self._remote.iov_len = nbytes - done
            got = _readv(pid, self._local_p, 1, self._remote_p, 1, 0)
            if got <= 0:
                err = ctypes.get_errno() if got < 0 else errno.EIO
                raise ShmError(
                    f"process_vm_readv from pid {pid} failed: {os.strerror(err)}",
                    op="shm_engine.read",
                    peer=pid,
                )
            done += got

    def probe(self, pid: int, remote_addr: int, expect: bytes) -> bool:
        """Whether reading ``len(expect)`` bytes at ``remote_addr`` of ``pid`` yields ``expect``."""
        buf = ctypes.create_string_buffer(len(expect))
        try:
            self.read(pid, remote_addr, ctypes.addressof(buf), len(expect))
        except ShmError:
            return False
        return buf.raw == expect
