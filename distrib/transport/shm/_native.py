"""The C step of the shared-memory all-reduce: built on first use, optional.

``_native.c`` is compiled with the system's C compiler (``$CC``, ``cc`` or
``gcc``) into a per-user cache the first time a group needs it, and loaded
with ctypes. Without a compiler (or on any build or load failure) ``load``
returns ``None`` and the engine keeps its numpy path; every local rank agrees
on one implementation at rendezvous, so a mixed group cannot happen.
``DISTRIB_NATIVE=0`` turns it off.

The build goes to a temporary name and is renamed into place, so ranks that
build at the same moment never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, NamedTuple

import numpy as np

from ..._config import config
from ..._reduce_op import ReduceOp

__all__ = ["NativeLib", "NativeStep", "load"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native.c")
_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}
_OPS = {ReduceOp.SUM: 0, ReduceOp.AVG: 0, ReduceOp.PRODUCT: 1}
_BUILD_TIMEOUT_S = 60.0
# After a build, libraries of other source versions untouched for this long (and
# temporaries of crashed builds) are removed from the cache. One still in use by
# an older install is only rebuilt the next time that install needs it.
_STALE_S = 7 * 24 * 3600.0

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distrib")


def _build(source: bytes, target: str) -> bool:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return False
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix="shm_native-", suffix=".so.tmp")
    os.close(fd)
    try:
        # -O3 (vectorizes the loops) and no -march: the result must run on any x86-64
        done = subprocess.run(
            [cc, "-O3", "-fPIC", "-shared", "-o", tmp, _SOURCE],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            return False
        os.replace(tmp, target)  # atomic: a concurrent loader sees all of it or nothing
        _prune(os.path.dirname(target), keep=os.path.basename(target))
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _prune(cache: str, keep: str) -> None:
    """Remove stale builds of other source versions (and stale temporaries)."""
    cutoff = time.time() - _STALE_S
    for name in os.listdir(cache):
        if name == keep or not name.startswith("shm_native-"):
            continue
        if not (name.endswith(".so") or name.endswith(".so.tmp")):
            continue
        path = os.path.join(cache, name)
        try:
            if os.stat(path).st_mtime < cutoff:
                os.unlink(path)  # a process that has it mapped keeps its copy
        except OSError:
            pass  # gone already, or not ours to remove


class NativeLib(NamedTuple):
    """The compiled library's two functions (ctypes, the GIL released during calls)."""

    step: Any  # distrib_shm_step: one pipeline step of the all-reduce
    stream_copy: Any  # distrib_stream_copy: memcpy with streaming stores


def load() -> NativeLib | None:
    """The compiled library, or ``None`` (no compiler, disabled, not x86-64)."""
    if config().native is False or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not sys.platform.startswith("linux"):
        return None
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        native = None
        try:
            with open(_SOURCE, "rb") as f:
                source = f.read()
            key = hashlib.sha256(source + b"-O3").hexdigest()[:16]
            target = os.path.join(_cache_dir(), f"shm_native-{key}.so")
            if os.path.exists(target) or _build(source, target):
                lib = ctypes.CDLL(target)  # CDLL releases the GIL during calls
                fn = lib.distrib_shm_step
                fn.restype = ctypes.c_int
                fn.argtypes = [
                    ctypes.c_int,  # stage
                    ctypes.c_int,  # dtype
                    ctypes.c_int,  # op
                    ctypes.c_void_p,  # own (this rank's chunk)
                    ctypes.c_void_p,  # slots: n pointers (this step's half of every slot)
                    ctypes.c_long,  # count (elements in the chunk)
                    ctypes.c_long,  # itemsize
                    ctypes.c_int,  # n
                    ctypes.c_int,  # rank
                    ctypes.c_void_p,  # counters: n pointers
                    ctypes.c_void_p,  # "waiting on" words: n pointers
                    ctypes.c_uint32,  # k
                    ctypes.c_long,  # spin
                    ctypes.c_int,  # verify
                    ctypes.c_int,  # stream: write into the slot with streaming stores
                    ctypes.c_void_p,  # out: the rank blocked on
                ]
                copy = lib.distrib_stream_copy
                copy.restype = None
                copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
                native = NativeLib(fn, copy)
        except OSError:
            native = None
        _loaded["lib"] = native
        return native


class NativeStep:
    """The C step bound to one engine's segment: pointer tables built once.

    Args:
        lib: what ``load`` returned.
        slot_addrs: ``slot_addrs[h][q]``: address of half ``h`` of rank ``q``'s slot.
        counters, waiting: addresses of every rank's counter and "waiting on" word.
        rank: this local rank.
    """

    MAX_RANKS = 64  # the C code's limit

    def __init__(
        self,
        lib: NativeLib,
        slot_addrs: list[list[int]],
        counters: list[int],
        waiting: list[int],
        rank: int,
    ) -> None:
        n = len(counters)
        ptrs = ctypes.c_void_p * n
        self._fn = lib.step
        self._copy = lib.stream_copy
        self._n = n
        self._rank = rank
        self._slots = [ptrs(*half) for half in slot_addrs]
        self._counters = ptrs(*counters)
        self._waiting = ptrs(*waiting)
        self._blocked = ctypes.c_int(-1)
        self._blocked_ref = ctypes.byref(self._blocked)

    def stream_copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``np.copyto(dst, src)`` for contiguous arrays of one dtype, with streaming stores."""
        self._copy(dst.ctypes.data, src.ctypes.data, dst.nbytes)

    @staticmethod
    def supports(dtype: np.dtype, op: ReduceOp) -> bool:
        return dtype in _DTYPES and op in _OPS

    @property
    def blocked_on(self) -> int:
        """The rank the last call stopped waiting for (stages 1 and 3)."""
        return self._blocked.value

    def __call__(
        self,
        stage: int,
        dtype: np.dtype,
        op: ReduceOp,
        chunk: np.ndarray,
        half: int,
        k: int,
        spin: int,
        verify: bool,
        stream: bool = False,
    ) -> int:
        return int(
            self._fn(
                stage,
                _DTYPES[dtype],
                _OPS[op],
                chunk.ctypes.data,
                self._slots[half],
                chunk.size,
                chunk.itemsize,
                self._n,
                self._rank,
                self._counters,
                self._waiting,
                k & 0xFFFFFFFF,
                spin,
                1 if verify else 0,
                1 if stream else 0,
                self._blocked_ref,
            )
        )
