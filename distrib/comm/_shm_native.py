"""The C step of the two-rank shared-memory all-reduce: built on first use, optional.

``_shm_native.c`` is compiled with the system's C compiler (``$CC`` or ``cc``)
into a per-user cache the first time a two-rank group needs it, and loaded
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
from typing import Any

import numpy as np

from .._config import config
from ._ops import ReduceOp

__all__ = ["NativeStep", "load"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shm_native.c")
_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}
_OPS = {ReduceOp.SUM: 0, ReduceOp.AVG: 0, ReduceOp.PRODUCT: 1}
_BUILD_TIMEOUT_S = 60.0

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
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".so.tmp")
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
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> Any:
    """The compiled step function, or ``None`` (no compiler, disabled, not x86-64)."""
    if config().native is False or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not sys.platform.startswith("linux"):
        return None
    with _lock:
        if "fn" in _loaded:
            return _loaded["fn"]
        fn = None
        try:
            with open(_SOURCE, "rb") as f:
                source = f.read()
            key = hashlib.sha256(source + b"-O3").hexdigest()[:16]
            target = os.path.join(_cache_dir(), f"shm_native-{key}.so")
            if os.path.exists(target) or _build(source, target):
                lib = ctypes.CDLL(target)  # CDLL releases the GIL during calls
                fn = lib.distrib_ar2_step
                fn.restype = ctypes.c_int
                fn.argtypes = [
                    ctypes.c_int,  # stage
                    ctypes.c_int,  # dtype
                    ctypes.c_int,  # op
                    ctypes.c_void_p,  # own
                    ctypes.c_void_p,  # slot_mine
                    ctypes.c_void_p,  # slot_peer
                    ctypes.c_long,  # itemsize
                    ctypes.c_long,  # lo
                    ctypes.c_long,  # hi
                    ctypes.c_long,  # olo
                    ctypes.c_long,  # ohi
                    ctypes.c_int,  # rank
                    ctypes.c_void_p,  # my counter
                    ctypes.c_void_p,  # peer counter
                    ctypes.c_void_p,  # peer's "waiting on" word
                    ctypes.c_uint32,  # k
                    ctypes.c_long,  # spin
                    ctypes.c_int,  # verify
                ]
        except OSError:
            fn = None
        _loaded["fn"] = fn
        return fn


class NativeStep:
    """Calls the C step for one (dtype, op); ``supports`` says which ones it has."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    @staticmethod
    def supports(dtype: np.dtype, op: ReduceOp) -> bool:
        return dtype in _DTYPES and op in _OPS

    def __call__(
        self,
        stage: int,
        dtype: np.dtype,
        op: ReduceOp,
        own: np.ndarray,
        slot_mine: np.ndarray,
        slot_peer: np.ndarray,
        bounds: tuple[int, int, int, int],
        rank: int,
        counters: tuple[int, int, int],
        k: int,
        spin: int,
        verify: bool,
    ) -> int:
        lo, hi, olo, ohi = bounds
        mine, peer, peer_waiting = counters
        return int(
            self._fn(
                stage,
                _DTYPES[dtype],
                _OPS[op],
                own.ctypes.data,
                slot_mine.ctypes.data,
                slot_peer.ctypes.data,
                own.itemsize,
                lo,
                hi,
                olo,
                ohi,
                rank,
                mine,
                peer,
                peer_waiting,
                k & 0xFFFFFFFF,
                spin,
                1 if verify else 0,
            )
        )
