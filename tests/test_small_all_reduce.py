"""The compiled road for small all-reduces (``distrib/transport/shm/_small.py``).

It must give the same bits as the general road, work with ranks that take the
general road in the same step, keep the mismatch check, and fail (never hang)
when a peer is late, dead or aborting.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import distrib as dist
from distrib.testing import Outcome, run_local_ranks

DTYPES = ["float32", "float64", "int32", "int64"]
OPS = ["SUM", "PRODUCT", "MIN", "MAX", "AVG"]


def test_extension_is_built() -> None:
    # The install builds it wherever there is a C compiler (this machine has one).
    from distrib.transport.shm import _oneshot

    assert _oneshot.OneShot is not None


def _inputs(rank: int, dtype: str, count: int, case: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * case + rank)
    if dtype.startswith("float"):
        x = rng.standard_normal(count).astype(dtype)
        special = [np.nan, np.inf, -0.0] if rank == 0 else [1.0, -np.inf, 0.0]
        x[: min(3, count)] = special[: min(3, count)]
        return x
    return rng.integers(-(2**20), 2**20, count).astype(dtype)


def _every_case(rank: int, world: int) -> list[list[str]]:
    """Each dtype and op, sizes around the small bound: the bytes of every result."""
    from distrib.comm._group import ProcessGroup

    pg = ProcessGroup.default
    assert pg is not None
    out = []
    for case, (dtype, op, count) in enumerate(
        (d, o, c) for d in DTYPES for o in OPS for c in (1, 7, 1024, 9000)
    ):
        if op == "AVG" and not dtype.startswith("float"):
            continue
        x = _inputs(rank, dtype, count, case)
        with np.errstate(all="ignore"):
            dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
        out.append([dtype, op, str(count), x.tobytes().hex()])
    out.append(["compiled road", str(pg._small is not None)])
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_same_bits_as_the_general_road(world: int) -> None:
    fast = run_local_ranks(_every_case, world, timeout=120, env={"DISTRIB_TRANSPORT": "shm"})
    slow = run_local_ranks(
        _every_case, world, timeout=120, env={"DISTRIB_TRANSPORT": "shm", "DISTRIB_NATIVE": "0"}
    )
    for results in (fast, slow):
        assert all(r.ok for r in results), "\n".join(r.describe() for r in results)
    assert fast[0].value[-1] == ["compiled road", "True"]
    assert slow[0].value[-1] == ["compiled road", "False"]
    for r in fast + slow:  # every rank holds the same result
        assert r.value == [*fast[0].value[:-1], r.value[-1]]
    assert fast[0].value[:-1] == slow[0].value[:-1]


def _mixed_roads(rank: int, world: int) -> list[float]:
    """Odd ranks keep an async all-reduce in flight, so they take the general road
    while even ranks take the compiled one, step after step."""
    got = []
    for i in range(200):
        x = np.full(64, float(rank + i), np.float32)
        if rank % 2:
            w = dist.all_reduce(np.ones(8, np.float32), async_op=True)
            dist.all_reduce(x)
            w.wait()
        else:
            dist.all_reduce(np.ones(8, np.float32))
            dist.all_reduce(x)
        got.append(float(x[0]))
    return got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_roads_mix_in_one_step(world: int) -> None:
    results = run_local_ranks(_mixed_roads, world, timeout=90, env={"DISTRIB_TRANSPORT": "shm"})
    assert all(r.ok for r in results), "\n".join(r.describe() for r in results)
    want = [float(sum(r + i for r in range(world))) for i in range(200)]
    for r in results:
        assert r.value == want


def _mismatched(rank: int, world: int, what: str) -> str:
    count, dtype, op = 256, np.float32, dist.ReduceOp.SUM
    if rank == 1 and what == "size":
        count = 512
    if rank == 1 and what == "dtype":
        dtype = np.float64
    if rank == 1 and what == "op":
        op = dist.ReduceOp.PRODUCT
    dist.all_reduce(np.ones(4, np.float32))  # a matching one first
    x = np.ones(count, dtype)
    try:
        dist.all_reduce(x, op=op)
    except dist.DistMismatchError as exc:
        assert (x == 1).all(), "a mismatched call wrote into the array"
        return str(exc)
    return "no error"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["size", "dtype", "op"])
def test_mismatch_is_named_on_every_rank(what: str) -> None:
    results = run_local_ranks(
        _mismatched, 2, what, timeout=60, group_timeout=20, env={"DISTRIB_TRANSPORT": "shm"}
    )
    assert all(r.ok for r in results), "\n".join(r.describe() for r in results)
    for r in results:
        assert "all_reduce" in r.value and "rank 1" in r.value, r.value


def _peer_fails(rank: int, world: int, how: str) -> str:
    dist.all_reduce(np.ones(16, np.float32))
    if rank == 1:
        if how == "dies":
            os._exit(3)
        time.sleep(5)  # late: past the group timeout
        return "late rank done"
    start = time.monotonic()
    try:
        dist.all_reduce(np.ones(16, np.float32))
    except dist.DistError as exc:
        return f"{type(exc).__name__} after {time.monotonic() - start:.1f}s: {exc}"
    return "no error"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["dies", "late"])
def test_a_failing_peer_is_an_error_not_a_hang(how: str) -> None:
    results = run_local_ranks(
        _peer_fails, 2, how, timeout=60, group_timeout=3, env={"DISTRIB_TRANSPORT": "shm"}
    )
    r0 = results[0]
    assert r0.outcome is Outcome.RETURNED, r0.describe()
    if how == "dies":
        assert r0.value.startswith("DistPeerLostError"), r0.value
        assert results[1].outcome is Outcome.DIED
    else:
        assert r0.value.startswith("DistTimeoutError"), r0.value
    assert "rank 1" in r0.value
    seconds = float(r0.value.split(" after ")[1].split("s:")[0])
    assert seconds < 10


def _oversubscribed(rank: int, world: int) -> float:
    x = np.zeros(1, np.float64)
    for i in range(300):
        x[0] = rank + i
        dist.all_reduce(x)
    return float(x[0])


@pytest.mark.timeout(120)
def test_more_ranks_than_cores() -> None:
    world = 2 * len(os.sched_getaffinity(0)) + 1
    results = run_local_ranks(_oversubscribed, world, timeout=90, env={"DISTRIB_TRANSPORT": "shm"})
    assert all(r.ok for r in results), "\n".join(r.describe() for r in results)
    assert {r.value for r in results} == {float(sum(q + 299 for q in range(world)))}


def _bad_op(rank: int, world: int) -> str:
    try:
        dist.all_reduce(np.ones(4, np.float32), op=[1])  # unhashable: never a cache key
    except dist.DistError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(60)
def test_a_bad_op_gets_the_general_roads_error() -> None:
    results = run_local_ranks(_bad_op, 2, timeout=45, env={"DISTRIB_TRANSPORT": "shm"})
    assert all(r.ok for r in results), "\n".join(r.describe() for r in results)
    for r in results:
        assert "unknown reduce op [1]" in r.value, r.value
