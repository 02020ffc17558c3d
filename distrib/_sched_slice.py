"""A waiting thread's scheduler slice: the shortest the kernel allows while it waits.

A rank that waits for a peer inside a collective has given its core away, often
to a compute thread of its own process. When the peer signals, the kernel lets
that thread finish its time slice before the waiter runs again (Linux's default
is 0.7-3 ms), and a large all-reduce synchronises dozens of times. Measured on 2
cores with one compute thread per rank, a synchronous 32 MiB all-reduce took
122 ms against 5 ms without the compute threads. A thread that asks for a short
slice (Linux 6.12+: ``sched_setattr`` with ``sched_runtime`` on a SCHED_OTHER
thread) is run within about that slice of its wake-up: 10 ms in the same run
(``benchmarks/bench_contended.py``, docs/performance.md). The slice changes when a thread runs, not
how much: its share of the CPU and its niceness stay as they were.

distrib's progress threads keep a short slice (``keep_short``); a caller's
thread gets one only once a collective has to wait for a peer (``shorten``,
from ``PhaseSync.wait``) and its own slice back when that collective ends
(``restore``). ``DISTRIB_SHORT_SLICE=0`` turns it off. On kernels before 6.12
the request is accepted and changes nothing; elsewhere (other systems and
architectures, a refused system call) every function here does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading

from ._config import config

__all__ = ["SHORT_SLICE_NS", "current_slice_ns", "keep_short", "restore", "shorten"]

# The shortest slice the kernel accepts for SCHED_OTHER threads (sched/syscalls.c
# clamps sched_runtime to 0.1-100 ms): the least a woken waiter can wait.
SHORT_SLICE_NS = 100_000

_SCHED_OTHER = 0
_SCHED_FLAG_RESET_ON_FORK = 0x01
# (sched_setattr, sched_getattr) by machine: the only two numbers that differ
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr``, version 1 (56 bytes, utilisation clamps included)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


class _ThreadState(threading.local):
    """This thread's slice before ``shorten`` (None: not shortened) and whether it
    keeps the short one for good."""

    original: int | None = None
    kept: bool = False


_state = _ThreadState()


@functools.cache
def _syscalls() -> tuple[ctypes.CDLL, int, int] | None:
    """libc and the two system call numbers, or None where there are none to make."""
    if not sys.platform.startswith("linux") or not config().short_slice is not False:
        return None
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc, numbers[0], numbers[1]


def _get(tid: int) -> _SchedAttr | None:
    calls = _syscalls()
    if calls is None:
        return None
    libc, _, getattr_nr = calls
    attr = _SchedAttr()
    if libc.syscall(getattr_nr, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return None
    return attr


def _set_runtime(ns: int) -> bool:
    """Give the calling thread slice ``ns``, keeping its policy and niceness; whether
    the kernel took it (only SCHED_OTHER threads are touched)."""
    attr = _get(0)
    if attr is None or attr.sched_policy != _SCHED_OTHER:
        return False
    libc, setattr_nr, _ = _syscalls()  # type: ignore[misc]  # _get succeeded
    attr.size = ctypes.sizeof(attr)
    attr.sched_flags &= _SCHED_FLAG_RESET_ON_FORK  # no clamp or keep-* flags
    attr.sched_runtime = ns
    return libc.syscall(setattr_nr, 0, ctypes.byref(attr), 0) == 0


def current_slice_ns(tid: int = 0) -> int | None:
    """Thread ``tid``'s requested slice in ns (0: the calling thread); None where it
    cannot be read. 0 means the kernel's default on kernels that report none."""
    attr = _get(tid)
    return None if attr is None else int(attr.sched_runtime)


def shorten() -> None:
    """Give the calling thread the short slice until ``restore`` (no-op when it has it)."""
    state = _state
    if state.original is not None or state.kept:
        return
    attr = _get(0)
    if attr is None or attr.sched_policy != _SCHED_OTHER:
        return
    if _set_runtime(SHORT_SLICE_NS):
        state.original = int(attr.sched_runtime)


def restore() -> None:
    """Give the calling thread back the slice it had before ``shorten`` (if it ran)."""
    state = _state
    if state.original is None or state.kept:
        return
    original, state.original = state.original, None
    _set_runtime(original)


def keep_short() -> None:
    """Give the calling thread (one of distrib's own) the short slice for good."""
    shorten()
    _state.kept = True


def _restore_in_child() -> None:
    # A forked child's one thread starts with its parent thread's slice: if that was
    # shortened here, the child's own code gets the original back.
    original, _state.original, _state.kept = _state.original, None, False
    if original is not None:
        _set_runtime(original)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restore_in_child)
