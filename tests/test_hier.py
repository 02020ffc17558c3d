"""The hierarchical engine: simulated hosts on 127.0.0.1, real processes and sockets.

Each rank builds the ``EngineContext`` a process group would, but with host ids
chosen by the test, so one machine plays several hosts: ranks with the same id
share a memfd segment, leaders talk ZeroMQ over TCP on 127.0.0.1. Layouts
interleave hosts (rank order != host order) and leave a host with one rank.
The real two-namespace run is in ``test_hier_netns.py``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _ranks import by_rank, failure_of

from distrib._reduce_op import ReduceOp
from distrib.store import PrefixStore
from distrib.store._file_store import FileStore
from distrib.testing import run_local_ranks
from distrib.transport._engine import EngineContext
from distrib.transport._select import make_cpu_engine
from distrib.transport.hier._engine import HierEngine
from distrib.transport.shm._engine import ShmEngine


def _context(path: str, rank: int, hosts: list[int], timeout: float) -> EngineContext:
    store = PrefixStore("g", FileStore(path, timeout=timeout))
    cache: list[Any] = []
    ctx = EngineContext(
        store=store,
        rank=rank,
        size=len(hosts),
        global_ranks=list(range(len(hosts))),
        timeout=timeout,
        host_ids=[f"host{h}" for h in hosts],
        bind_host="127.0.0.1",
        transport="auto",
    )

    def make_zmq() -> Any:
        if not cache:
            from distrib.transport.zmq._engine import ZmqEngine

            cache.append(ZmqEngine(ctx))
        return cache[0]

    ctx.make_zmq_engine = make_zmq
    return ctx


def _engine_rank(
    rank: int, n: int, path: str, hosts: list[int], scenario: Any, timeout: float
) -> Any:
    eng = make_cpu_engine(_context(path, rank, hosts, timeout))
    try:
        return scenario(eng, rank, n)
    finally:
        if eng is not None:
            eng.close()


def run_hosts(
    tmp_path: Any, hosts: list[int], scenario: Callable[..., Any], timeout: float = 20.0
) -> dict[int, tuple[str, Any]]:
    """Run ``scenario(engine, rank, n)`` on ranks placed on simulated ``hosts``."""
    path = str(tmp_path / f"store-{time.monotonic_ns()}")
    results = run_local_ranks(
        _engine_rank,
        len(hosts),
        path,
        hosts,
        scenario,
        timeout,
        start_method="fork",
        init_group=False,
        timeout=timeout + 15,
    )
    return by_rank(results)


def _data(rank: int, count: int, dtype: Any = np.int64) -> np.ndarray:
    return np.random.default_rng(7 + rank).integers(-9, 10, count).astype(dtype)


def _suite(eng: Any, rank: int, n: int) -> dict[Any, Any]:
    dl = time.monotonic() + 20
    res: dict[Any, Any] = {"engine": type(eng).__name__}
    for count in (0, 5, 3001, 300_001):  # 300k int64 spans many shm steps and zmq segments
        buf = _data(rank, count)
        eng.all_reduce(buf, ReduceOp.SUM, 1, dl, call=None)
        res[("all_reduce", count)] = buf
    buf = _data(rank, 1000, np.float32)
    eng.all_reduce(buf, ReduceOp.MAX, 2, dl, call=None)
    res[("all_reduce_max",)] = buf
    for root in range(n):
        buf = _data(rank, 2049, np.float64)
        eng.broadcast(buf, root, 3 + root, dl, call=None)
        res[("broadcast", root)] = buf
    m = 777
    ag = np.zeros(m * n, np.int32)
    ag[rank * m : (rank + 1) * m] = _data(rank, m, np.int32)
    eng.all_gather(ag, 20, dl, call=None)
    res[("all_gather",)] = ag
    eng.barrier(21, dl, call=None)
    # the collectives HierEngine hands to the flat ZeroMQ engine
    rs = np.zeros(m, np.int64)
    eng.reduce_scatter(_data(rank, m * n), rs, ReduceOp.SUM, 22, dl, call=None)
    res[("reduce_scatter",)] = rs
    red = _data(rank, 100)
    eng.reduce(red, ReduceOp.SUM, n - 1, 23, dl, call=None)
    if rank == n - 1:
        res[("reduce",)] = red
    a2a = np.zeros(m * n, np.int64)
    eng.all_to_all(_data(rank, m * n), a2a, 24, dl, call=None)
    res[("all_to_all",)] = a2a
    if rank in (0, n - 1):
        peer = n - 1 - rank
        if rank == 0:
            eng.send(_data(rank, 10), peer, 5, dl, call=None)
            # as the group does: wait for the receiver's verdict, so this rank cannot
            # exit (dropping what zmq has not sent yet) before the peer has the data
            assert eng.confirm_send(peer, 5, eng.last_send(peer, 5), None, dl)
        else:
            got = np.zeros(10, np.int64)
            eng.recv(got, peer, 5, dl, call=None)
            res[("recv",)] = got
    return res


LAYOUTS = {
    "2x2-interleaved": [0, 1, 0, 1],
    "3+1": [0, 0, 0, 1],
    "2+3": [1, 0, 1, 0, 0],
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hierarchical_collectives_match_numpy(tmp_path: Any, layout: str) -> None:
    hosts = LAYOUTS[layout]
    n = len(hosts)
    results = run_hosts(tmp_path, hosts, _suite)
    errors = [v for s, v in results.values() if s != "ok"]
    assert not errors, "\n".join(errors)
    assert sorted(results) == list(range(n))
    for rank in range(n):
        res = results[rank][1]
        assert res["engine"] == "HierEngine"
        for count in (0, 5, 3001, 300_001):
            want = sum(_data(q, count) for q in range(n))
            np.testing.assert_array_equal(res[("all_reduce", count)], want)
        want = np.max([_data(q, 1000, np.float32) for q in range(n)], axis=0)
        np.testing.assert_array_equal(res[("all_reduce_max",)], want)
        for root in range(n):
            np.testing.assert_array_equal(res[("broadcast", root)], _data(root, 2049, np.float64))
        m = 777
        want = np.concatenate([_data(q, m, np.int32) for q in range(n)])
        np.testing.assert_array_equal(res[("all_gather",)], want)
        full = sum(_data(q, m * n) for q in range(n))
        np.testing.assert_array_equal(res[("reduce_scatter",)], full[rank * m : (rank + 1) * m])
        if rank == n - 1:
            np.testing.assert_array_equal(res[("reduce",)], sum(_data(q, 100) for q in range(n)))
            np.testing.assert_array_equal(res[("recv",)], _data(0, 10))
        want = np.concatenate([_data(q, m * n)[rank * m : (rank + 1) * m] for q in range(n)])
        np.testing.assert_array_equal(res[("all_to_all",)], want)


def _kind(eng: Any, rank: int, n: int) -> str:
    return type(eng).__name__


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "hosts,want",
    [([0, 0, 0], "ShmEngine"), ([0, 1, 2], "NoneType"), ([0, 0, 1], "HierEngine")],
)
def test_engine_choice_follows_host_layout(tmp_path: Any, hosts: list[int], want: str) -> None:
    results = run_hosts(tmp_path, hosts, _kind)
    assert {v for _, v in results.values()} == {want}, results
    assert issubclass(HierEngine, object) and issubclass(ShmEngine, object)


def _remote_rank_dies(eng: Any, rank: int, n: int) -> Any:
    buf = np.ones(1000, np.float32)
    eng.all_reduce(buf, ReduceOp.SUM, 1, time.monotonic() + 20, call=None)
    if rank == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return failure_of(lambda: eng.all_reduce(buf, ReduceOp.SUM, 2, time.monotonic() + 3, call=None))


@pytest.mark.timeout(60)
def test_rank_dying_on_another_host_fails_everyone_within_timeout(tmp_path: Any) -> None:
    # hosts: {0, 1} and {2, 3}; rank 3 (not a leader) is killed mid-run
    results = run_hosts(tmp_path, [0, 0, 1, 1], _remote_rank_dies, timeout=10)
    assert 3 not in results
    for rank in (0, 1, 2):
        status, value = results[rank]
        assert status == "ok" and value is not None, (rank, value)
        name, _peer, elapsed = value
        assert name in ("DistPeerLostError", "DistTimeoutError"), value
        assert elapsed < 5.0, value
    # rank 2 shares memory with rank 3: it sees the death itself, fast
    assert results[2][1][0] == "DistPeerLostError" and results[2][1][1] == 3
    assert results[2][1][2] < 2.0
