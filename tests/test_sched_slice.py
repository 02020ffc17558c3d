"""A thread that waits on a peer asks for the kernel's shortest scheduler slice.

The caller's thread gets it only while a collective waits and its own slice back
when the collective ends; distrib's progress thread keeps it; niceness and policy
never change; ``DISTRIB_SHORT_SLICE=0`` and systems without ``sched_setattr``
change nothing. Kernels before 6.12 accept the request and ignore it, so the
tests that read the slice back need 6.12 or later.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time

import numpy as np
import pytest
from _ranks import rank_values

import distrib
from distrib import _sched_slice
from distrib._sched_slice import SHORT_SLICE_NS, current_slice_ns, keep_short, restore, shorten
from distrib.testing import run_local_ranks

pytestmark = pytest.mark.timeout(120)


def _kernel_has_slices() -> bool:
    """Linux 6.12+ on x86_64 or aarch64: what the kernel is, not what the code says."""
    release = platform.release().split(".")
    try:
        version = (int(release[0]), int(release[1].split("-")[0]))
    except (IndexError, ValueError):
        return False
    return (
        sys.platform.startswith("linux")
        and platform.machine() in ("x86_64", "aarch64")
        and version >= (6, 12)
    )


needs_slices = pytest.mark.skipif(
    not _kernel_has_slices(), reason="per-thread slices need Linux 6.12+ on x86_64 or aarch64"
)


def _in_thread(fn):
    """Run ``fn`` on a fresh thread (the test's own thread keeps its slice); its result."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(30)
    assert out, "the thread did not finish"
    return out[0]


@needs_slices
def test_shorten_then_restore_gives_the_thread_its_own_slice_back():
    def body():
        before = current_slice_ns()
        shorten()
        during = current_slice_ns()
        shorten()  # already short: nothing to remember twice
        restore()
        return before, during, current_slice_ns()

    before, during, after = _in_thread(body)
    assert during == SHORT_SLICE_NS
    assert before != SHORT_SLICE_NS and after == before


@needs_slices
def test_niceness_and_policy_are_kept():
    def body():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 7)  # this thread only
        tid = threading.get_native_id()
        shorten()
        during = (os.getpriority(os.PRIO_PROCESS, tid), current_slice_ns())
        restore()
        return during, os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(0)

    (nice, slice_ns), nice_after, policy = _in_thread(body)
    assert nice == 7 and slice_ns == SHORT_SLICE_NS
    assert nice_after == 7 and policy == os.SCHED_OTHER


@needs_slices
def test_a_kept_slice_survives_restore():
    def body():
        keep_short()
        restore()
        return current_slice_ns()

    assert _in_thread(body) == SHORT_SLICE_NS


@needs_slices
def test_a_forked_child_gets_the_original_slice_back():
    def body():
        before = current_slice_ns()
        shorten()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its slice, leave at once
            os.write(w, str(current_slice_ns()).encode())
            os._exit(0)
        os.close(w)
        child = int(os.read(r, 64))
        os.close(r)
        os.waitpid(pid, 0)
        restore()
        return before, child

    before, child = _in_thread(body)
    assert child == before


@pytest.mark.parametrize("why", ["DISTRIB_SHORT_SLICE=0", "another architecture"])
def test_nothing_changes_where_it_is_off_or_unsupported(monkeypatch, why):
    if why == "DISTRIB_SHORT_SLICE=0":
        monkeypatch.setenv("DISTRIB_SHORT_SLICE", "0")
    else:
        monkeypatch.setattr(_sched_slice.platform, "machine", lambda: "sparc64")
    _sched_slice._kernel.cache_clear()
    try:

        def body():
            shorten()
            return current_slice_ns()

        assert _in_thread(body) is None  # not even read: no system call is made
    finally:
        monkeypatch.undo()
        _sched_slice._kernel.cache_clear()


def test_a_bad_value_set_after_the_probe_never_fails_a_wait(monkeypatch):
    _sched_slice._kernel.cache_clear()
    monkeypatch.setenv("DISTRIB_SHORT_SLICE", "sometimes")
    try:
        _in_thread(lambda: (shorten(), restore()))  # no exception: nothing asked
        assert _sched_slice._kernel() is None
    finally:
        monkeypatch.undo()
        _sched_slice._kernel.cache_clear()


def test_a_bad_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("DISTRIB_SHORT_SLICE", "sometimes")
    with pytest.raises(distrib.DistUsageError, match="DISTRIB_SHORT_SLICE"):
        distrib._config.config()


# -- in a process group ------------------------------------------------------------


def _slices_of_a_waiting_caller(rank: int, world: int) -> dict:
    """Rank 0 waits in a synchronous all-reduce for rank 1 (which starts late) while a
    sampler thread reads the waiting thread's slice; then an async call reports the
    progress thread's."""
    x = np.ones(1 << 20, np.float32)  # 4 MiB: several pipeline steps
    distrib.barrier()
    main = threading.get_native_id()
    before = current_slice_ns(main)
    seen: list[int | None] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.append(current_slice_ns(main))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    if rank == 0:
        sampler.start()
    else:
        time.sleep(0.5)  # rank 0 waits on this rank meanwhile
    distrib.all_reduce(x)
    done.set()
    if rank == 0:
        sampler.join()
    after = current_slice_ns(main)
    small = np.ones(1024, np.float32)  # 4 KiB: the compiled one-step road, same promise
    if rank == 1:
        time.sleep(0.3)
    distrib.all_reduce(small)
    after_small = current_slice_ns(main)
    distrib.all_reduce(x, async_op=True).wait()
    progress = [t for t in threading.enumerate() if t.name.startswith("distrib-progress")]
    return {
        "before": before,
        "during": min((s for s in seen if s is not None), default=None),
        "after": after,
        "after_small": after_small,
        "progress": [current_slice_ns(t.native_id) for t in progress],
        "sum_ok": bool(np.all(x == world * world)),  # 1 -> world -> world * world
    }


@needs_slices
def test_a_collective_that_waits_runs_short_and_gives_the_slice_back():
    out = rank_values(run_local_ranks(_slices_of_a_waiting_caller, 2, timeout=90))
    waiter = out[0]
    assert waiter["before"] != SHORT_SLICE_NS
    assert waiter["during"] == SHORT_SLICE_NS, waiter
    assert waiter["after"] == waiter["before"], waiter
    assert waiter["after_small"] == waiter["before"], waiter
    for rank_out in out:
        assert rank_out["sum_ok"]
        assert rank_out["progress"] == [SHORT_SLICE_NS], rank_out


@needs_slices
def test_distrib_short_slice_0_leaves_every_thread_alone():
    out = rank_values(
        run_local_ranks(
            _slices_of_a_waiting_caller, 2, timeout=90, env={"DISTRIB_SHORT_SLICE": "0"}
        )
    )
    waiter = out[0]
    assert waiter["during"] is None and waiter["after"] is None  # never read, never set
    assert waiter["after_small"] is None
    for rank_out in out:
        assert rank_out["sum_ok"] and rank_out["progress"] == [None]


@needs_slices
def test_a_thread_on_the_default_slice_gets_the_default_back_not_a_copy_of_it():
    # The kernel reports the default slice as a number; writing that number back
    # would make it a custom slice that no longer follows the kernel's default.
    def body():
        shorten()
        remembered = _sched_slice._state.original
        restore()
        return remembered

    assert _in_thread(body) == 0  # restore asks for 0: "the kernel's default"
