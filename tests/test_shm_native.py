"""The C step of the two-rank shared-memory all-reduce (distrib/transport/shm/_native.c).

Ranks are forked processes driving the engine directly (as in test_shm_engine).
The C step must give numpy's bits, wait like the numpy path (slow peers, dead
peers, mismatched calls), and be used only when every local rank has it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from _ranks import failure_of, rank_values
from test_shm_engine import run_ranks

from distrib._reduce_op import ReduceOp
from distrib.testing import run_local_ranks
from distrib.transport.shm._native import load

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(load() is None, reason="no C compiler: the numpy path is used"),
]


def _inputs(rank: int, count: int, dtype: Any) -> np.ndarray:
    return np.random.default_rng(50 + rank).standard_normal(count).astype(dtype)


def _counting(eng: Any) -> list[int]:
    calls = [0]
    fn = eng._native._fn

    def counted(*args: Any) -> int:
        calls[0] += 1
        return fn(*args)

    eng._native._fn = counted
    return calls


CASES = [
    (70_000, np.float32, ReduceOp.SUM),  # 280 KB: one step, just above the one-shot sizes
    (300_001, np.float32, ReduceOp.SUM),  # 1.2 MB, odd: two steps, halves of unequal length
    (1_000_003, np.float64, ReduceOp.SUM),  # 8 MB: several steps
    (262_144, np.float64, ReduceOp.PRODUCT),
    (150_000, np.float32, ReduceOp.AVG),  # the engine sums; the API divides afterwards
]


def _native_and_numpy(eng: Any, rank: int, n: int) -> Any:
    assert eng._native is not None, "the C step was not agreed on"
    calls = _counting(eng)
    out = []
    for count, dtype, op in CASES:
        a, b = _inputs(rank, count, dtype), _inputs(rank, count, dtype)
        eng.all_reduce(a, op, 0, time.monotonic() + 30, call=None)
        native = eng._native
        eng._native = None  # the numpy path, same processes, same inputs
        eng.all_reduce(b, op, 0, time.monotonic() + 30, call=None)
        eng._native = native
        out.append((a, b))
    return out, calls[0]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_native_step_gives_numpy_bits_and_rank_order(tmp_path: Any, n: int) -> None:
    results = run_ranks(tmp_path, n, _native_and_numpy, part=None, timeout=60)
    for rank in range(n):
        pairs, calls = results[rank][1]
        assert calls >= len(CASES), "the C step was not used"
        for (count, dtype, op), (native, numpy_path) in zip(CASES, pairs, strict=True):
            inputs = [_inputs(q, count, dtype) for q in range(n)]
            want = inputs[0]
            for x in inputs[1:]:  # rank order: ((x0 op x1) op x2) ...
                want = want * x if op is ReduceOp.PRODUCT else want + x
            np.testing.assert_array_equal(native, want)
            np.testing.assert_array_equal(native, numpy_path)


def test_both_ranks_get_identical_bits(tmp_path: Any) -> None:
    results = run_ranks(tmp_path, 2, _native_and_numpy, part=None)
    for (a0, _), (a1, _) in zip(results[0][1][0], results[1][1][0], strict=True):
        assert a0.tobytes() == a1.tobytes()


def _slow_peer(eng: Any, rank: int, n: int) -> Any:
    buf = _inputs(rank, 500_000, np.float32)
    if rank == 1:
        time.sleep(0.5)  # far longer than the C step spins: rank 0 waits in PhaseSync
    start = time.monotonic()
    eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 20, call=None)
    return buf, time.monotonic() - start


@pytest.mark.parametrize("n", [2, 3])
def test_native_step_waits_for_a_slow_peer(tmp_path: Any, n: int) -> None:
    results = run_ranks(tmp_path, n, _slow_peer, part=None)
    want = _inputs(0, 500_000, np.float32)
    for q in range(1, n):
        want = want + _inputs(q, 500_000, np.float32)
    for rank in range(n):
        buf, _ = results[rank][1]
        np.testing.assert_array_equal(buf, want)
    assert results[0][1][1] >= 0.3  # rank 0 really waited for rank 1


def _peer_dies(eng: Any, rank: int, n: int) -> Any:
    buf = np.zeros(500_000, np.float32)
    eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 20, call=None)  # both alive here
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return failure_of(
        lambda: eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 20, call=None)
    )


@pytest.mark.parametrize("n", [2, 3])
def test_native_step_names_a_dead_peer(tmp_path: Any, n: int) -> None:
    results = run_ranks(tmp_path, n, _peer_dies, part=None, expect_errors=True)
    for rank in [r for r in range(n) if r != 1]:
        status, value = results[rank]
        assert status == "ok" and value is not None, value
        name, peer, elapsed = value
        assert name == "DistPeerLostError" and peer == 1, value
        assert elapsed < 3, value


def _mismatch(eng: Any, rank: int, n: int) -> Any:
    from distrib.transport._calldesc import CallDesc, CallsDiffer, mismatch_error

    buf = np.zeros(300_000, np.float32)
    shape = (300_000,) if rank == 0 else (600, 500)
    call = CallDesc("all_reduce", shape, "<f4", "SUM")
    try:
        eng.all_reduce(buf, ReduceOp.SUM, 1, time.monotonic() + 10, call=call)
    except CallsDiffer as differ:
        err = mismatch_error(differ.calls, rank, [0, 1], 1, differ.op)
        return type(err).__name__, err.peer, str(err), bool((buf == 0).all())
    return None


def test_native_step_detects_mismatched_calls(tmp_path: Any) -> None:
    results = run_ranks(tmp_path, 2, _mismatch, part=None)
    # Both sides name both calls (exchanged through the segment) and wrote nothing.
    for rank, other in ((0, 1), (1, 0)):
        name, peer, msg, untouched = results[rank][1]
        assert name == "DistMismatchError" and peer == other and untouched, msg
        assert "rank 0 called all_reduce(op=SUM, 300000 x float32, shape [300000]" in msg, msg
        assert "rank 1 called all_reduce(op=SUM, 300000 x float32, shape [600, 500]" in msg, msg


def _agree(rank: int, n: int, path: str) -> Any:
    from distrib.store._file_store import FileStore
    from distrib.transport.shm._rendezvous import connect_local

    eng = connect_local(
        FileStore(path), "t", rank, n, [0, 1], time.monotonic() + 20, use_native=rank == 0
    )
    assert eng is not None
    buf = np.full(300_000, rank + 1.0, np.float32)
    eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 20, call=None)
    got = (rank, eng._native is None, float(buf[0]), float(buf[-1]))
    eng.close()
    return got


def test_ranks_use_the_c_step_only_if_all_have_it(tmp_path: Any) -> None:
    results = run_local_ranks(
        _agree, 2, str(tmp_path / "s"), start_method="fork", init_group=False, timeout=60
    )
    got = sorted(rank_values(results))
    assert got == [(0, True, 3.0, 3.0), (1, True, 3.0, 3.0)]


def _load_in_subprocess(env: dict[str, str]) -> str:
    code = "from distrib.transport.shm._native import load; print(load() is not None)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip()


def test_build_into_a_fresh_cache_off_switch_and_no_compiler(tmp_path: Any) -> None:
    fresh = str(tmp_path / "cache")
    assert _load_in_subprocess({"XDG_CACHE_HOME": fresh}) == "True"
    built = os.listdir(os.path.join(fresh, "distrib"))
    assert len(built) == 1 and built[0].endswith(".so"), built  # no temporary left behind
    assert _load_in_subprocess({"XDG_CACHE_HOME": fresh, "DISTRIB_NATIVE": "0"}) == "False"
    broken = str(tmp_path / "no-cc")
    assert _load_in_subprocess({"XDG_CACHE_HOME": broken, "CC": "/bin/false"}) == "False"
    assert not os.path.exists(os.path.join(broken, "distrib")) or not [
        f for f in os.listdir(os.path.join(broken, "distrib")) if f.endswith(".so")
    ]


def test_a_build_prunes_stale_builds_of_other_versions(tmp_path: Any) -> None:
    cache = tmp_path / "cache"
    (cache / "distrib").mkdir(parents=True)
    old = time.time() - 8 * 24 * 3600
    files = {
        "shm_native-0000000000000000.so": old,  # another version, stale: removed
        "shm_native-deadbeefdeadbeef.so.tmp": old,  # a crashed build's temporary: removed
        "shm_native-1111111111111111.so": time.time(),  # another version, recent: kept
        "notes.txt": old,  # not ours: kept
    }
    for name, mtime in files.items():
        path = cache / "distrib" / name
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    assert _load_in_subprocess({"XDG_CACHE_HOME": str(cache)}) == "True"
    left = sorted(os.listdir(cache / "distrib"))
    built = [n for n in left if n.endswith(".so") and n not in files]
    assert len(built) == 1, left
    assert left == sorted([built[0], "shm_native-1111111111111111.so", "notes.txt"]), left
