"""distrib.multiprocessing.spawn: torch's semantics for results and failures."""

from __future__ import annotations

import os
import pickle
import signal
import time

import numpy as np
import pytest

import distrib.multiprocessing as mp
import distrib.shm as shm
from distrib import DistError

pytestmark = pytest.mark.timeout(60)


def _fill_row(i, out):
    out[i] = i + 1


def _raise_on_one(i, ready):
    if i == 1:
        raise ValueError("boom from worker one")
    ready.set()
    time.sleep(30)  # the parent must terminate us


def _exit_three(i):
    if i == 0:
        os._exit(3)
    time.sleep(30)


def _sigkill_self(i):
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_spawn_runs_fn_with_index_and_shared_args(method):
    out = shm.zeros((3, 4))
    assert mp.spawn(_fill_row, args=(out,), nprocs=3, start_method=method) is None
    assert out[:, 0].tolist() == [1.0, 2.0, 3.0] and (out == out[:, :1]).all()


def test_child_raises_terminates_others_and_reports_traceback():
    ready = mp.get_context("fork").Event()
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException) as info:
        mp.spawn(_raise_on_one, args=(ready,), nprocs=3, start_method="fork")
    assert time.monotonic() - start < 20  # the sleepers were terminated, not waited for
    err = info.value
    assert err.error_index == 1 and isinstance(err.pid, int)
    assert "ValueError: boom from worker one" in str(err) and "Traceback" in str(err)
    assert isinstance(err, DistError) and err.rank == 1
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.error_index, back.pid) == (type(err), 1, err.pid)


def test_child_exit_code_is_reported():
    with pytest.raises(mp.ProcessExitedException) as info:
        mp.spawn(_exit_three, nprocs=2, start_method="fork")
    err = info.value
    assert (err.error_index, err.exit_code, err.signal_name) == (0, 3, None)
    assert "exit code 3" in str(err)


def test_child_killed_by_signal_is_named():
    with pytest.raises(mp.ProcessExitedException) as info:
        mp.spawn(_sigkill_self, nprocs=2, start_method="fork")
    err = info.value
    assert (err.error_index, err.exit_code, err.signal_name) == (1, -9, "SIGKILL")
    assert "SIGKILL" in str(err)


def test_join_false_returns_context_with_timed_join():
    out = shm.zeros(2)
    ctx = mp.spawn(_fill_row, args=(out,), nprocs=2, join=False, start_method="fork")
    assert isinstance(ctx, mp.ProcessContext) and len(ctx.pids()) == 2
    deadline = time.monotonic() + 30
    while not ctx.join(timeout=1):
        assert time.monotonic() < deadline
    assert out.tolist() == [1.0, 2.0]


def test_join_false_reports_failures_too():
    ctx = mp.spawn(_exit_three, nprocs=2, join=False, start_method="fork")
    with pytest.raises(mp.ProcessExitedException, match="exit code 3"):
        deadline = time.monotonic() + 30
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="nprocs"):
        mp.spawn(_fill_row, nprocs=0)
    with pytest.raises(TypeError, match="callable"):
        mp.spawn(42)
    with pytest.raises(TypeError, match="args must be a tuple"):
        mp.spawn(_fill_row, args=[np.zeros(1)])
    with pytest.raises(ValueError, match="context"):
        mp.spawn(_fill_row, start_method="teleport")


def _fake_driver_file_then_die(i, how):
    # What the CUDA driver creates in a process that exports IPC events; only its
    # exit handler removes it, which SIGKILL and os._exit skip.
    open(f"/dev/shm/cuda.shm.0.{os.getpid():x}.1", "w").close()
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)


@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_parent_removes_cuda_driver_files_of_ended_children(how):
    # a file of another (live) process must stay: only ended children are cleaned up
    other = f"/dev/shm/cuda.shm.0.{os.getpid():x}.7"
    open(other, "w").close()
    try:
        procs = [mp.Process(target=_fake_driver_file_then_die, args=(i, how)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(20)
        assert [p.exitcode for p in procs] == (
            [-signal.SIGKILL] * 2 if how == "sigkill" else [0, 0]
        )
        left = [n for n in os.listdir("/dev/shm") if n.startswith("cuda.shm.")]
        assert not any(f"{p.pid:x}" == n.split(".")[3] for n in left for p in procs), left
        assert os.path.exists(other)
    finally:
        os.unlink(other)
