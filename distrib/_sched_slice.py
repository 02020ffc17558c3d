"""A waiting thread's scheduler slice: the shortest the kernel allows while it waits.

A rank that waits for a peer inside a collective has given its core away, often
to a compute thread of its own process. When the peer signals, the kernel lets
that thread finish its time slice before the waiter runs again (Linux's default
is 0.7-3 ms), and a large all-reduce synchronises dozens of times. Measured on 2
cores with one compute thread per rank, a synchronous 32 MiB all-reduce took
122 ms against 5 ms without the compute threads. A thread that asks for a short
slice (Linux 6.12+: ``sched_setattr`` with ``sched_runtime`` on a SCHED_OTHER
thread) is run within about that slice of its wake-up: 10 ms in the same run
(``benchmarks/bench_contended.py``, docs/performance.md). The slice changes
when a thread runs, not how much: its share of the CPU and its niceness stay.

distrib's progress threads keep a short slice (``keep_short``); a caller's
thread gets one only once a collective has to wait for a peer (``shorten``,
from ``PhaseSync.wait``) and its own slice back when that collective ends
(``restore``). ``DISTRIB_SHORT_SLICE=0`` turns it off. A first probe on a
throwaway thread decides whether to ask at all: kernels before 6.12 accept the
request and ignore it, so there (and on other systems and architectures, or when
the call is refused) nothing is asked and every function here does nothing.
Threads and processes that a shortened thread starts inherit its slice, as they
inherit its niceness; under a seccomp profile that kills on ``sched_setattr``
(not merely refuses it) set ``DISTRIB_SHORT_SLICE=0``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading
from typing import NamedTuple

from ._config import config

__all__ = ["SHORT_SLICE_NS", "current_slice_ns", "enabled", "keep_short", "restore", "shorten"]

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


class _Kernel(NamedTuple):
    """How to reach the two system calls, and the slice a thread has by default."""

    libc: ctypes.CDLL
    setattr_nr: int
    getattr_nr: int
    default_ns: int


def _get(kernel: _Kernel, tid: int) -> _SchedAttr | None:
    attr = _SchedAttr()
    if kernel.libc.syscall(kernel.getattr_nr, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0):
        return None
    return attr


def _set(kernel: _Kernel, ns: int) -> bool:
    """Give the calling thread slice ``ns`` (0: the kernel's default), keeping its
    policy and niceness; whether the kernel took it. Only SCHED_OTHER threads."""
    attr = _get(kernel, 0)
    if attr is None or attr.sched_policy != _SCHED_OTHER:
        return False
    attr.size = ctypes.sizeof(attr)
    attr.sched_flags &= _SCHED_FLAG_RESET_ON_FORK  # no clamp or keep-* flags
    attr.sched_runtime = ns
    return kernel.libc.syscall(kernel.setattr_nr, 0, ctypes.byref(attr), 0) == 0


@functools.cache
def _kernel() -> _Kernel | None:
    """The kernel's calls when it honours per-thread slices, else None (nothing is
    ever asked). Probed once, on a throwaway thread: the short slice must read back,
    and a request for 0 shows the default that ``restore`` gives back as 0 (a
    nonzero value would stay a custom slice)."""
    try:
        if config().short_slice is False or not sys.platform.startswith("linux"):
            return None
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None or ctypes.sizeof(ctypes.c_void_p) != 8:  # 32-bit: other numbers
            return None
        probe = _Kernel(ctypes.CDLL(None, use_errno=True), numbers[0], numbers[1], 0)
        seen: list[int] = []

        def measure() -> None:
            if _set(probe, SHORT_SLICE_NS) and (attr := _get(probe, 0)) is not None:
                seen.append(int(attr.sched_runtime))
                if _set(probe, 0) and (attr := _get(probe, 0)) is not None:
                    seen.append(int(attr.sched_runtime))

        thread = threading.Thread(target=measure, name="distrib-slice-probe")
        thread.start()
        thread.join()
        if len(seen) != 2 or seen[0] != SHORT_SLICE_NS:
            return None  # before Linux 6.12 the request is accepted and ignored
        return probe._replace(default_ns=seen[1])
    except Exception:  # a late bad DISTRIB_* value, no libc: never fail a collective
        return None


def enabled() -> bool:
    """Whether waiting threads get the short slice here (reads ``DISTRIB_SHORT_SLICE``
    the first time: call it where configuration errors belong, at group creation)."""
    if config().short_slice is False:
        return False
    return _kernel() is not None


def current_slice_ns(tid: int = 0) -> int | None:
    """Thread ``tid``'s slice in ns (0: the calling thread); None where this module
    asks nothing (off, or a kernel without per-thread slices)."""
    kernel = _kernel()
    attr = None if kernel is None else _get(kernel, tid)
    return None if attr is None else int(attr.sched_runtime)


def shorten() -> None:
    """Give the calling thread the short slice until ``restore`` (no-op when it has it)."""
    state = _state
    if state.original is not None or state.kept:
        return
    kernel = _kernel()
    if kernel is None:
        return
    attr = _get(kernel, 0)
    if attr is not None and _set(kernel, SHORT_SLICE_NS):
        original = int(attr.sched_runtime)
        state.original = 0 if original == kernel.default_ns else original


def restore() -> None:
    """Give the calling thread back the slice it had before ``shorten`` (if it ran)."""
    state = _state
    if state.original is None or state.kept:
        return
    original, state.original = state.original, None
    kernel = _kernel()
    if kernel is not None:
        _set(kernel, original)


def keep_short() -> None:
    """Give the calling thread (one of distrib's own) the short slice for good."""
    shorten()
    _state.kept = True


def _restore_in_child() -> None:
    # A forked child's one thread starts with its parent thread's slice: if that was
    # shortened here, the child's own code gets the original back.
    original, _state.original, _state.kept = _state.original, None, False
    if original is not None:
        kernel = _kernel()  # already probed: this thread shortened its slice with it
        if kernel is not None:
            _set(kernel, original)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restore_in_child)
