"""The shared-memory engine on its own: real processes, one memfd segment, a FileStore.

Each case forks ``n`` ranks (``run_local_ranks``, no process group) that
rendezvous through a ``FileStore`` in the test's tmp dir, run a scenario
against ``ShmEngine`` and return its results. Small ``part_bytes`` make even
short arrays span many pipeline steps, so both halves and the lag-2 reuse
guard are exercised.
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

from distrib import DistPeerLostError, DistTimeoutError
from distrib._reduce_op import ReduceOp
from distrib.store._file_store import FileStore
from distrib.testing import run_local_ranks
from distrib.transport.shm._rendezvous import connect_local

SIZES = [1, 2, 3, 4]
PART = 256  # bytes per rank per step: many steps for small arrays


def _engine_rank(
    rank: int, n: int, path: str, scenario: Callable[..., Any], part: int, timeout: float
) -> Any:
    store = FileStore(path, timeout=timeout)
    eng = connect_local(
        store, "t", rank, n, list(range(n)), time.monotonic() + timeout, part_bytes=part
    )
    assert eng is not None, "shared-memory engine unavailable"
    try:
        return scenario(eng, rank, n)
    finally:
        eng.close()


def run_ranks(
    tmp_path: Any,
    n: int,
    scenario: Callable[..., Any],
    *,
    part: int = PART,
    timeout: float = 30.0,
    expect_errors: bool = False,
) -> dict[int, tuple[str, Any]]:
    """Run ``scenario(engine, rank, n)`` in ``n`` forked ranks; return {rank: (status, value)}."""
    path = str(tmp_path / f"store-{n}-{time.monotonic_ns()}")
    results = by_rank(
        run_local_ranks(
            _engine_rank,
            n,
            path,
            scenario,
            part,
            timeout,
            start_method="fork",
            init_group=False,
            timeout=timeout + 15,
        )
    )
    if not expect_errors:
        errors = {r: v for r, (s, v) in results.items() if s != "ok"}
        assert not errors, "\n".join(f"rank {r}: {v}" for r, v in errors.items())
        assert len(results) == n, f"only ranks {sorted(results)} reported"
    return results


def _data(rank: int, count: int, dtype: Any) -> np.ndarray:
    rng = np.random.default_rng(1000 + rank)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-50, 50, count).astype(dtype)
    return rng.integers(-8, 8, count).astype(dtype)  # exact in float: order-free sums


# -- collectives against numpy ---------------------------------------------


def _collectives(eng: Any, rank: int, n: int) -> dict[str, Any]:
    dl = time.monotonic() + 20
    res: dict[str, Any] = {}
    for count in (0, 1, 7, 513):
        for dtype in (np.float32, np.int64):
            for op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.MIN):
                buf = _data(rank, count, dtype)
                eng.all_reduce(buf, op, 0, dl, call=None)
                res[("all_reduce", count, np.dtype(dtype).name, op.name)] = buf
    buf = _data(rank, 300, np.int32)
    eng.all_reduce(buf, ReduceOp.BXOR, 0, dl, call=None)
    res[("all_reduce_bxor",)] = buf
    for root in range(n):
        buf = _data(rank, 333, np.float64)
        eng.broadcast(buf, root, 0, dl, call=None)
        res[("broadcast", root)] = buf
        buf = _data(rank, 101, np.float32)
        eng.reduce(buf, ReduceOp.SUM, root, 0, dl, call=None)
        if rank == root:
            res[("reduce", root)] = buf
        src = _data(root, 37 * n, np.int16) if rank == root else None
        out = np.zeros(37, np.int16)
        eng.scatter(src, out, root, 0, dl, call=None)
        res[("scatter", root)] = out
        gout = np.zeros(61 * n, np.float32) if rank == root else None
        eng.gather(_data(rank, 61, np.float32), gout, root, 0, dl, call=None)
        if rank == root:
            res[("gather", root)] = gout
    m = 129
    ag = np.zeros(m * n, np.float64)
    ag[rank * m : (rank + 1) * m] = _data(rank, m, np.float64)
    eng.all_gather(ag, 0, dl, call=None)
    res[("all_gather",)] = ag
    rs = np.zeros(m, np.float32)
    eng.reduce_scatter(_data(rank, m * n, np.float32), rs, ReduceOp.SUM, 0, dl, call=None)
    res[("reduce_scatter",)] = rs
    a2a = np.zeros(m * n, np.int32)
    eng.all_to_all(_data(rank, m * n, np.int32), a2a, 0, dl, call=None)
    res[("all_to_all",)] = a2a
    eng.barrier(0, dl, call=None)
    return res


_REDUCE = {"SUM": np.add, "MAX": np.maximum, "MIN": np.minimum}


def _fold(fn: Any, arrays: list[np.ndarray]) -> np.ndarray:
    acc = arrays[0].copy()
    for a in arrays[1:]:
        acc = fn(acc, a)
    return acc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", SIZES)
def test_collectives_match_numpy(tmp_path: Any, n: int) -> None:
    results = run_ranks(tmp_path, n, _collectives)
    for rank in range(n):
        res = results[rank][1]
        for count in (0, 1, 7, 513):
            for dtype in (np.float32, np.int64):
                for opname, fn in _REDUCE.items():
                    want = _fold(fn, [_data(q, count, dtype) for q in range(n)])
                    got = res[("all_reduce", count, np.dtype(dtype).name, opname)]
                    np.testing.assert_array_equal(got, want, err_msg=f"rank {rank} {opname}")
        want = _fold(np.bitwise_xor, [_data(q, 300, np.int32) for q in range(n)])
        np.testing.assert_array_equal(res[("all_reduce_bxor",)], want)
        for root in range(n):
            np.testing.assert_array_equal(res[("broadcast", root)], _data(root, 333, np.float64))
            np.testing.assert_array_equal(
                res[("scatter", root)], _data(root, 37 * n, np.int16)[rank * 37 : (rank + 1) * 37]
            )
            if rank == root:
                want = _fold(np.add, [_data(q, 101, np.float32) for q in range(n)])
                np.testing.assert_array_equal(res[("reduce", root)], want)
                want = np.concatenate([_data(q, 61, np.float32) for q in range(n)])
                np.testing.assert_array_equal(res[("gather", root)], want)
        m = 129
        want = np.concatenate([_data(q, m, np.float64) for q in range(n)])
        np.testing.assert_array_equal(res[("all_gather",)], want)
        full = _fold(np.add, [_data(q, m * n, np.float32) for q in range(n)])
        np.testing.assert_array_equal(res[("reduce_scatter",)], full[rank * m : (rank + 1) * m])
        want = np.concatenate(
            [_data(q, m * n, np.int32)[rank * m : (rank + 1) * m] for q in range(n)]
        )
        np.testing.assert_array_equal(res[("all_to_all",)], want)


def _float_sum_identical(eng: Any, rank: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(rank)
    buf = rng.standard_normal(10_000).astype(np.float32)
    eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 20, call=None)
    return buf


@pytest.mark.timeout(60)
def test_float_all_reduce_is_bit_identical_on_every_rank(tmp_path: Any) -> None:
    n = 3
    results = run_ranks(tmp_path, n, _float_sum_identical, part=4096)
    inputs = [np.random.default_rng(q).standard_normal(10_000).astype(np.float32) for q in range(n)]
    want = (inputs[0] + inputs[1]) + inputs[2]  # rank order, as documented
    for rank in range(n):
        np.testing.assert_array_equal(results[rank][1], want)


def _default_parts(eng: Any, rank: int, n: int) -> float:
    # several MiB: crosses the default (large) part size, many steps
    buf = np.full(3 << 20, rank + 1, np.float32)
    for _ in range(3):
        buf[:] = rank + 1
        eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 30, call=None)
    return float(buf.min()), float(buf.max())


@pytest.mark.timeout(90)
def test_large_buffers_with_default_part_size(tmp_path: Any) -> None:
    n = 2
    results = run_ranks(tmp_path, n, _default_parts, part=None)
    for rank in range(n):
        assert results[rank][1] == (3.0, 3.0)


# -- oversubscription ----------------------------------------------------------


def _many_small(eng: Any, rank: int, n: int) -> int:
    buf = np.zeros(64, np.int64)
    for _ in range(200):
        buf[:] = 1
        eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 30, call=None)
        assert int(buf[0]) == n
    return int(buf.sum())


@pytest.mark.timeout(90)
def test_oversubscribed_seven_ranks_on_two_cores_complete(tmp_path: Any) -> None:
    # 7 ranks, 2 cores: waiters must sleep (futex), not spin the others off the CPU.
    n = 7
    results = run_ranks(tmp_path, n, _many_small, timeout=60)
    assert all(results[r][1] == 64 * n for r in range(n))


# -- failures ------------------------------------------------------------------


def _die_midway(how: str) -> Callable[..., Any]:
    def scenario(eng: Any, rank: int, n: int) -> Any:
        buf = np.ones(4096, np.float32)
        eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 20, call=None)  # all alive here
        if rank == n - 1:
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif how == "exit":
                os._exit(3)
            elif how == "hang":
                time.sleep(4)  # longer than the others' 1.5 s deadline
                os._exit(0)
        start = time.monotonic()
        try:
            eng.all_reduce(
                buf, ReduceOp.SUM, 0, time.monotonic() + (1.5 if how == "hang" else 20), call=None
            )
        except Exception as exc:
            return (
                type(exc).__name__,
                getattr(exc, "rank", None),
                getattr(exc, "op", None),
                getattr(exc, "peer", None),
                time.monotonic() - start,
            )
        return None

    return scenario


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "how,exc_name",
    [("sigkill", "DistPeerLostError"), ("exit", "DistPeerLostError"), ("hang", "DistTimeoutError")],
)
def test_dead_or_stuck_peer_raises_within_timeout(tmp_path: Any, how: str, exc_name: str) -> None:
    n = 3
    if how == "hang":
        results = run_ranks(tmp_path, n, _die_midway(how), timeout=10, expect_errors=True)
    else:
        results = run_ranks(tmp_path, n, _die_midway(how), expect_errors=True)
    for rank in range(n - 1):
        status, value = results[rank]
        assert status == "ok", value
        assert value is not None, f"rank {rank} did not notice the failure"
        name, erank, op, peer, elapsed = value
        # the rank that detects the problem raises exc_name; a rank told by the
        # first one's abort raises DistPeerLostError; both name the dead/stuck rank
        assert name in (exc_name, "DistPeerLostError"), value
        assert erank == rank and op == "all_reduce", value
        assert peer == n - 1, value
        assert elapsed < (3.5 if how == "hang" else 3), value
    names = {results[r][1][0] for r in range(n - 1)}
    assert exc_name in names


def _die_while_others_read_me(eng: Any, rank: int, n: int) -> Any:
    """The last rank dies after publishing its first final part, as the others
    start copying it out of its memory (single-copy all-reduce)."""
    if eng._reader is None:
        return "no-cma"
    eng._native = None  # the C step would take these sizes
    buf = np.ones(4 << 20, np.float32)  # 16 MiB: several chunks on the single-copy path
    if rank == n - 1:
        eng._pull = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    return failure_of(
        lambda: eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 20, call=None)
    )


@pytest.mark.timeout(60)
def test_peer_dying_during_single_copy_all_reduce_is_named(tmp_path: Any) -> None:
    n = 3
    results = run_ranks(tmp_path, n, _die_while_others_read_me, expect_errors=True)
    if results[0][1] == "no-cma":
        pytest.skip("process_vm_readv is not permitted here: the staged path is used instead")
    for rank in range(n - 1):
        status, value = results[rank]
        assert status == "ok" and value is not None, value
        name, peer, elapsed = value
        assert name == "DistPeerLostError" and peer == n - 1, value
        assert elapsed < 3, value


def _abort_one(eng: Any, rank: int, n: int) -> Any:
    buf = np.ones(16, np.float32)
    eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 20, call=None)
    if rank == 0:
        eng.abort("test asked rank 0 to abort")
    try:
        eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 20, call=None)
    except DistPeerLostError as exc:
        return str(exc)
    return None


@pytest.mark.timeout(60)
def test_abort_fails_every_local_rank_fast(tmp_path: Any) -> None:
    results = run_ranks(tmp_path, 3, _abort_one)
    assert "test asked rank 0 to abort" in results[0][1]
    for rank in (1, 2):
        assert results[rank][1] is not None and "rank 0" in results[rank][1]


def test_error_classes_are_the_documented_ones() -> None:
    assert issubclass(DistTimeoutError, TimeoutError)
    assert issubclass(DistPeerLostError, ConnectionError)


def _list_shm(eng: Any, rank: int, n: int) -> tuple[int, list[str]]:
    eng.barrier(0, time.monotonic() + 10, call=None)
    return os.getpid(), sorted(os.listdir("/dev/shm"))


@pytest.mark.timeout(60)
def test_segment_has_no_name_in_dev_shm(tmp_path: Any) -> None:
    results = run_ranks(tmp_path, 2, _list_shm)
    # Only names these ranks could have made are looked at (others use /dev/shm too).
    pids = [str(results[r][1][0]) for r in (0, 1)]
    during = set(results[0][1][1]) | set(results[1][1][1])
    assert not [e for e in during if "distrib" in e and any(p in e for p in pids)]


def _mismatch(eng: Any, rank: int, n: int) -> Any:
    from distrib.transport._calldesc import CallDesc, CallsDiffer, mismatch_error

    dl = time.monotonic() + 10
    buf = np.ones(100, np.float32)
    reduce = CallDesc("all_reduce", (100,), "<f4", "SUM")
    # matching (compared in its first step): passes
    eng.all_reduce(buf, ReduceOp.SUM, 0, dl, call=reduce)
    before = buf.copy()
    try:
        if rank == 1:
            eng.agree(CallDesc("broadcast", (100,), "<f4", root=0), 1, dl)
            eng.broadcast(buf, 0, 1, dl, call=None)
        else:
            eng.all_reduce(buf, ReduceOp.SUM, 1, dl, call=reduce)
    except CallsDiffer as differ:
        err = mismatch_error(differ.calls, rank, [0, 1], 1, differ.op)
        return type(err).__name__, err.peer, str(err), bool((buf == before).all())
    return None


@pytest.mark.timeout(60)
def test_mismatched_collectives_are_named_on_both_sides(tmp_path: Any) -> None:
    results = run_ranks(tmp_path, 2, _mismatch)
    name, peer, msg, untouched = results[0][1]
    assert name == "DistMismatchError" and peer == 1 and untouched, msg
    assert "rank 0 called all_reduce(op=SUM, 100 x float32" in msg
    assert "rank 1 called broadcast(root=0, 100 x float32" in msg
    name, peer, msg, untouched = results[1][1]
    assert name == "DistMismatchError" and peer == 0 and untouched, msg
    assert "rank 1 called broadcast(root=0" in msg and "rank 0 called all_reduce(" in msg


def _large_reductions(eng: Any, rank: int, n: int) -> Any:
    if eng._reader is None:
        return "no-cma"
    eng._native = None  # the C step would take the float cases (tests/test_shm_native.py)
    dl = time.monotonic() + 30
    out = {}
    for count, dtype in ((1_000_003, np.int32), (400_001, np.float64), (262_144, np.int64)):
        buf = _data(rank, count, dtype)
        eng.all_reduce(buf, ReduceOp.SUM, 0, dl, call=None)
        out[(count, np.dtype(dtype).name)] = buf
    rng = np.random.default_rng(rank)
    buf = rng.standard_normal(700_001).astype(np.float32)
    eng.all_reduce(buf, ReduceOp.SUM, 0, dl, call=None)
    out["float"] = buf
    buf = _data(rank, 300_000, np.int64)  # the staged (non-CMA) reduce path in between
    eng.reduce(buf, ReduceOp.MAX, n - 1, 0, dl, call=None)
    if rank == n - 1:
        out["reduce"] = buf
    return out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("n", [2, 3])
def test_single_copy_large_all_reduce_matches_numpy(tmp_path: Any, n: int) -> None:
    results = run_ranks(tmp_path, n, _large_reductions, part=None)
    if results[0][1] == "no-cma":
        pytest.skip("process_vm_readv is not permitted here: the staged path is used instead")
    inputs = [
        np.random.default_rng(q).standard_normal(700_001).astype(np.float32) for q in range(n)
    ]
    want_float = _fold(np.add, inputs)  # rank order, as documented
    for rank in range(n):
        res = results[rank][1]
        for count, dtype in ((1_000_003, np.int32), (400_001, np.float64), (262_144, np.int64)):
            want = _fold(np.add, [_data(q, count, dtype) for q in range(n)])
            np.testing.assert_array_equal(res[(count, np.dtype(dtype).name)], want)
        np.testing.assert_array_equal(res["float"], want_float)
        if rank == n - 1:
            want = _fold(np.maximum, [_data(q, 300_000, np.int64) for q in range(n)])
            np.testing.assert_array_equal(res["reduce"], want)


def test_a_peer_that_signals_while_the_store_host_leaves_completes_the_wait():
    """Rank 0 hosts the store: once the last step's signals are in, it may finish and
    exit. A waiter whose failure check meets the closed store just then must see the
    signal that arrived meanwhile and complete, not report rank 0 lost."""
    import ctypes
    import mmap

    from distrib._errors import DistPeerLostError
    from distrib.transport.shm._sync import PhaseSync, header_bytes

    buf = mmap.mmap(-1, header_bytes(2))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    pids = [os.getpid(), os.getpid()]
    peer = PhaseSync(memoryview(buf), addr, 1, 2, [0, 1], pids, spin=0, yield_s=0.0)
    calls = []

    def store_gone():
        calls.append(1)
        peer.signal(1)  # the peer's signal lands while the store is asked ...
        raise DistPeerLostError("store.check: lost the connection to the store", rank=0)

    waiter = PhaseSync(
        memoryview(buf), addr, 0, 2, [0, 1], pids, spin=0, yield_s=0.0, check_failed=store_gone
    )
    waiter.wait(1, 1, "barrier", time.monotonic() + 10)  # ... so the wait completes
    assert calls, "the failure check never ran: the test did not reach the race"

    def store_gone_no_signal():
        raise DistPeerLostError("store.check: lost the connection to the store", rank=0)

    waiter2 = PhaseSync(
        memoryview(buf),
        addr,
        0,
        2,
        [0, 1],
        pids,
        spin=0,
        yield_s=0.0,
        check_failed=store_gone_no_signal,
    )
    with pytest.raises(DistPeerLostError):  # no signal: the lost store is the error
        waiter2.wait(1, 2, "barrier", time.monotonic() + 10)
