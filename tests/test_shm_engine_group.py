"""The shared-memory engine behind real process groups (``init_process_group`` / ``new_group``).

The full collective suite already runs under both transports in
``test_collectives.py``; here: which engine each transport picks (world group
and a subgroup), and that a SIGKILLed rank makes the others raise, naming it,
well within the timeout, exactly as on the ZeroMQ path.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import distrib as dist
from distrib.comm import _api
from distrib.testing import run_local_ranks


def _engines(rank: int, world: int) -> tuple[str, str]:
    world_engine = type(_api._require("test").group.cpu_engine).__name__
    sub = dist.new_group([0, 2])
    sub_engine = ""
    if rank in (0, 2):
        x = np.full(1000, rank, np.float32)
        dist.all_reduce(x, group=sub)
        assert (x == 2).all(), x[:4]
        sub_engine = type(sub.cpu_engine).__name__
    x = np.ones(5000, np.float64)
    dist.all_reduce(x)
    assert (x == world).all()
    return world_engine, sub_engine


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "transport,want", [("auto", "ShmEngine"), ("shm", "ShmEngine"), ("zmq", "ZmqEngine")]
)
def test_transport_picks_the_engine(transport: str, want: str) -> None:
    results = run_local_ranks(
        _engines, 3, timeout=60, group_timeout=20, env={"DISTRIB_TRANSPORT": transport}
    )
    assert all(r.ok for r in results), [r.describe() for r in results if not r.ok]
    assert [r.value[0] for r in results] == [want] * 3
    assert [r.value[1] for r in results] == [want, "", want]


def _killed_mid_run(rank: int, world: int) -> tuple[str, object, float] | None:
    x = np.ones(1 << 16, np.float32)
    dist.all_reduce(x)
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        for _ in range(50):
            dist.all_reduce(x)
    except dist.DistError as exc:
        return type(exc).__name__, exc.peer, time.monotonic() - start
    return None


@pytest.mark.timeout(90)
def test_sigkilled_rank_fails_the_others_fast_and_named() -> None:
    results = run_local_ranks(_killed_mid_run, 3, timeout=60, group_timeout=20)
    assert results[2].exitcode == -signal.SIGKILL
    for r in results[:2]:
        assert r.error is None, r.describe()
        assert r.value is not None, f"rank {r.rank} did not notice"
        name, peer, elapsed = r.value
        assert name == "DistPeerLostError", r.value
        assert peer == 2, r.value
        assert elapsed < 5.0, r.value  # the timeout is 20 s: liveness, not the timeout
