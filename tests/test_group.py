"""Process groups: rendezvous methods, queries, subgroups, async Work, argument errors."""

from __future__ import annotations

import datetime

import numpy as np
import pytest

import distrib as dist
import distrib.comm as dcomm
from distrib.store._rendezvous import rank_and_size_from_env
from distrib.testing import run_local_ranks
from tests._util import free_port


def _assert_all_ok(results):
    bad = [r.describe() for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    return [r.value for r in results]


def _init_and_sum(rank, world_size, method):
    try:
        if method == "env":
            dist.init_process_group(timeout=datetime.timedelta(seconds=20))
        else:
            dist.init_process_group("gloo", method, rank=rank, world_size=world_size, timeout=20)
        a = np.full(3, dist.get_rank() + 1, np.int64)
        dist.all_reduce(a)
        got = (dist.get_rank(), dist.get_world_size(), dist.get_backend(), a.tolist())
        dist.destroy_process_group()
        return got
    except BaseException as exc:
        return repr(exc)


def _launch(method, envs):
    """Each rank joins through ``method`` itself (the harness makes no group)."""
    results = run_local_ranks(
        _init_and_sum, len(envs), method, init_group=False, env=envs, timeout=60
    )
    got = [r.value for r in results]
    assert all(r.exitcode == 0 for r in results), [r.describe() for r in results]
    return sorted(got, key=str)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["env", "slurm", "tcp", "file"])
def test_rendezvous_methods(method, tmp_path):
    n, port = 3, free_port()
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if method == "env":
        envs = [{**base, "RANK": str(r), "WORLD_SIZE": str(n)} for r in range(n)]
    elif method == "slurm":
        envs = [{**base, "SLURM_PROCID": str(r), "SLURM_NTASKS": str(n)} for r in range(n)]
        method = "env"
    else:
        envs = [{} for _ in range(n)]
        method = f"tcp://127.0.0.1:{port}" if method == "tcp" else f"file://{tmp_path}/rdzv"
    got = _launch(method, envs)
    assert [g[:2] for g in got] == [(r, n) for r in range(n)], got
    assert all(g[3] == [6, 6, 6] for g in got)


def test_env_fallbacks_for_launchers():
    assert rank_and_size_from_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}) == (
        2,
        4,
    )
    assert rank_and_size_from_env({"PMI_RANK": "1", "PMI_SIZE": "3"}) == (1, 3)
    assert rank_and_size_from_env({"RANK": "0", "WORLD_SIZE": "2", "PMI_RANK": "5"}) == (0, 2)
    with pytest.raises(dist.DistUsageError, match="RANK='x'"):
        rank_and_size_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def _single_rank_checks():
    assert not dist.is_initialized()
    with pytest.raises(dist.DistUsageError, match="not initialized"):
        dist.all_reduce(np.zeros(1))
    with pytest.raises(dist.DistUsageError, match="unknown backend"):
        dist.init_process_group("mpi-ish")
    dist.init_process_group(rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(dist.DistUsageError, match="already initialized"):
            dist.init_process_group()
        a = np.arange(4.0)
        dist.all_reduce(a, op=dist.ReduceOp.MAX)
        assert a.tolist() == [0, 1, 2, 3]
        with pytest.raises(TypeError, match="numpy or cupy array"):
            dist.all_reduce([1, 2])
        # A torch tensor (stand-in: its class lives in module "torch") gets the fix named.
        tensor_cls = type("Tensor", (), {"__module__": "torch"})
        with pytest.raises(TypeError, match=r"got torch\.Tensor; pass tensor\.numpy\(\)"):
            dist.all_reduce(tensor_cls())
        with pytest.raises(TypeError, match="numeric"):
            dist.all_reduce(np.array(["a"]))
        with pytest.raises(ValueError, match="read-only"):
            ro = np.zeros(2)
            ro.flags.writeable = False
            dist.all_reduce(ro)
        with pytest.raises(dist.DistUsageError, match="needs an integer"):
            dist.all_reduce(np.zeros(2), op=dist.ReduceOp.BXOR)
        with pytest.raises(dist.DistUsageError, match=r"AVG.*undefined for bool"):
            dist.all_reduce(np.zeros(2, bool), op=dist.ReduceOp.AVG)
        with pytest.raises(dist.DistUsageError, match="src=3 is not a member"):
            dist.broadcast(np.zeros(2), src=3)
        with pytest.raises(ValueError, match="list of 1 arrays"):
            dist.all_gather([], np.zeros(2))
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()


@pytest.mark.timeout(30)
def test_single_process_group_and_argument_errors():
    _single_rank_checks()


def _groups_and_async(rank, n):
    out = {}
    # Async ops run in issue order on the progress thread while we compute.
    arrays = [np.full(1 << 16, rank + k, np.float32) for k in range(4)]
    works = [dist.all_reduce(a, async_op=True) for a in arrays]
    busy = float(np.sum(np.arange(10000.0)))  # "compute" meanwhile
    assert busy > 0
    for w in works:
        assert w.wait(timeout=20) is True and w.is_completed() and w.exception() is None
    out["async"] = [float(a[0]) for a in arrays]
    # Two disjoint subgroups run collectives concurrently; a third spans them.
    evens = dist.new_group([0, 2])
    odds = dist.new_group([1, 3])
    mine = evens if rank % 2 == 0 else odds
    other = odds if rank % 2 == 0 else evens
    assert other is dcomm.GroupMember.NON_GROUP_MEMBER
    assert dist.get_rank(other) == -1 and dist.all_reduce(np.zeros(1), group=other) is None
    v = np.array([rank], np.int64)
    dist.all_reduce(v, group=mine)
    out["sub"] = int(v[0])
    out["subrank"] = (dist.get_rank(mine), dist.get_world_size(mine))
    b = np.array([rank * 10], np.int64)
    dist.broadcast(b, src=3 if rank % 2 else 2, group=mine)
    out["subbcast"] = int(b[0])
    top = dist.new_group([0, 1, 2, 3])
    w = np.ones(5, np.int32)
    dist.all_reduce(w, group=top)
    out["top"] = int(w.sum())
    dist.barrier(group=top)
    dist.destroy_process_group(mine)
    with pytest.raises(dist.DistClosedError, match="destroyed"):
        dist.all_reduce(np.zeros(1), group=mine)
    return out


@pytest.mark.timeout(90)
def test_subgroups_and_async_work():
    values = _assert_all_ok(run_local_ranks(_groups_and_async, 4, timeout=60))
    for rank, v in enumerate(values):
        assert v["async"] == [float(sum(r + k for r in range(4))) for k in range(4)]
        assert v["sub"] == (2 if rank % 2 == 0 else 4)
        assert v["subrank"] == (rank // 2, 2)
        assert v["subbcast"] == (30 if rank % 2 else 20)
        assert v["top"] == 20


def _released_after_async(rank, world):
    """An array given to an async collective is freed once its Work and the caller's
    references are gone, while the group sits idle."""
    import gc
    import time
    import weakref

    a = np.ones(1 << 16)
    work = dist.all_reduce(a, async_op=True)
    work.wait()
    gone = weakref.ref(a)
    del a, work
    gc.collect()
    time.sleep(0.05)
    return gone() is None


def test_the_progress_thread_keeps_nothing_of_finished_work():
    assert _assert_all_ok(run_local_ranks(_released_after_async, 2, timeout=60)) == [True, True]
