"""Every GPU collective at world sizes 1..4 with all ranks on one GPU, against numpy.

Ranks share the device, so ``make_gpu_engine`` picks the CUDA-IPC engine (NCCL
refuses duplicate GPUs). Each rank derives every rank's input from a seed, so
it computes the numpy reference itself. Needs cupy and a CUDA device.
"""

from __future__ import annotations

import time
import traceback

import numpy as np
import pytest
from _gpu import cupy_or_skip

cupy = cupy_or_skip()

from distrib.store import TCPStore  # noqa: E402
from distrib.testing import run_local_ranks  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120)]

# (dtype, ops) cases; lengths include one that does not divide by any world size,
# one large enough for the vector path with a tail, and a misaligned view.
# Every op on float32 and int32; one or two per other dtype (each pair compiles kernels).
REDUCE_CASES = [
    ("float32", ["SUM", "AVG", "PRODUCT", "MIN", "MAX"]),
    ("int32", ["SUM", "PRODUCT", "BAND", "BOR", "BXOR"]),
    ("float64", ["SUM"]),
    ("float16", ["SUM"]),
    ("int8", ["MAX"]),
    ("uint64", ["BXOR"]),
    ("complex64", ["PRODUCT"]),
    ("bool", ["SUM", "BXOR"]),
]
LENGTHS = [1, 1003, (1 << 18) + 5]


def _inputs(seed, size, n, dtype):
    """Every rank's input for one case (identical on every rank)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    out = []
    for _ in range(size):
        if dt.kind == "b":
            out.append(rng.random(n) < 0.5)
        elif dt.kind in "iu":
            out.append(rng.integers(1, 6, n).astype(dt))
        elif dt.kind == "c":
            out.append((rng.random(n) + 1j * rng.random(n) + 0.5).astype(dt))
        else:
            out.append((rng.random(n) + 0.5).astype(dt))
    return out


_NP = {
    "SUM": np.add,
    "AVG": np.add,
    "PRODUCT": np.multiply,
    "MIN": np.minimum,
    "MAX": np.maximum,
    "BAND": np.bitwise_and,
    "BOR": np.bitwise_or,
    "BXOR": np.bitwise_xor,
}


def _reference(xs, opname):
    acc = xs[0].astype(np.float64) if xs[0].dtype.kind == "f" else xs[0].copy()
    if xs[0].dtype.kind == "c":
        acc = xs[0].astype(np.complex128)
    for x in xs[1:]:
        acc = _NP[opname](acc, x)
    # Engines accumulate AVG as SUM; the process group divides (tested in test_gpu_group.py).
    return acc.astype(xs[0].dtype)


def _check(got, want, what):
    tol = {"e": 2e-3, "f": 1e-5, "d": 1e-12, "F": 1e-5, "D": 1e-12}.get(want.dtype.char)
    if tol is None:
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, rtol=tol, atol=0, err_msg=what)


def _engine(rank, size, port, prefix, timeout=60.0):
    from distrib.store import PrefixStore, TCPStore
    from distrib.transport._engine import EngineContext
    from distrib.transport.gpu._select import make_gpu_engine

    store = PrefixStore(prefix, TCPStore("127.0.0.1", port, is_master=False, timeout=timeout))
    ctx = EngineContext(
        store=store,
        rank=rank,
        size=size,
        global_ranks=list(range(size)),
        timeout=timeout,
        host_ids=["h"] * size,
    )
    return make_gpu_engine(ctx), store


def _run_all(engine, rank, size):
    import cupy

    from distrib._reduce_op import ReduceOp

    seq = iter(range(1, 1 << 30))
    dl = time.monotonic() + 100

    def dev(a):
        return cupy.asarray(a)

    case = 0
    for dtype, ops in REDUCE_CASES:
        for n in LENGTHS:
            for opname in ops:
                case += 1
                xs = _inputs(case, size, n, dtype)
                want = _reference(xs, opname)
                op = ReduceOp[opname]
                buf = dev(xs[rank])
                engine.all_reduce(buf, op, next(seq), dl, call=None)
                _check(buf.get(), want, f"all_reduce {dtype} {opname} n={n}")
                for root in range(size):
                    buf = dev(xs[rank])
                    engine.reduce(buf, op, root, next(seq), dl, call=None)
                    if rank == root:
                        _check(buf.get(), want, f"reduce {dtype} {opname} root={root}")
            # reduce_scatter over size*m elements, m = n
            xs = _inputs(case + 1000, size, n * size, dtype)
            opname = ops[0]
            want = _reference(xs, opname)[rank * n : (rank + 1) * n]
            out = cupy.empty(n, dtype=dtype)
            engine.reduce_scatter(dev(xs[rank]), out, ReduceOp[opname], next(seq), dl, call=None)
            _check(out.get(), want, f"reduce_scatter {dtype} {opname} n={n}")

    # A misaligned view (offset 4 bytes into a pooled allocation): the scalar path.
    xs = _inputs(7, size, 4099, "float32")
    base = cupy.zeros(4100, dtype=cupy.float32)
    view = base[1:]
    view[...] = dev(xs[rank])
    engine.all_reduce(view, ReduceOp.SUM, next(seq), dl, call=None)
    _check(view.get(), _reference(xs, "SUM"), "all_reduce misaligned view")
    assert float(base[0]) == 0.0, "wrote outside the view"

    for n in (1, 1001):
        xs = _inputs(99 + n, size, n, "float64")
        for root in range(size):
            buf = dev(xs[rank])
            engine.broadcast(buf, root, next(seq), dl, call=None)
            _check(buf.get(), xs[root], f"broadcast root={root}")
            out = cupy.full(n * size, -1.0) if rank == root else None
            engine.gather(dev(xs[rank]), out, root, next(seq), dl, call=None)
            if rank == root:
                _check(out.get(), np.concatenate(xs), f"gather root={root}")
            big = _inputs(200 + root, size, n * size, "int64")
            out = cupy.full(n, -1, dtype=cupy.int64)
            engine.scatter(
                dev(big[root]) if rank == root else None, out, root, next(seq), dl, call=None
            )
            _check(out.get(), big[root][rank * n : (rank + 1) * n], f"scatter root={root}")
        out = cupy.full(n * size, -7.0)
        out[rank * n : (rank + 1) * n] = dev(xs[rank])
        engine.all_gather(out, next(seq), dl, call=None)
        _check(out.get(), np.concatenate(xs), "all_gather")
        blocks = _inputs(300 + n, size, n * size, "int32")
        out = cupy.full(n * size, -1, dtype=cupy.int32)
        engine.all_to_all(dev(blocks[rank]), out, next(seq), dl, call=None)
        want = np.concatenate([blocks[i][rank * n : (rank + 1) * n] for i in range(size)])
        _check(out.get(), want, "all_to_all")

    # send/recv around a ring, twice with different tags, sends first (they must not block)
    if size > 1:
        right, left = (rank + 1) % size, (rank - 1) % size
        mine = [dev(np.full(513, rank * 10 + t, dtype=np.float32)) for t in range(2)]
        for t in range(2):
            engine.send(mine[t], right, t, dl, call=None)
            mine[t][...] = -5  # the send buffer may be reused at once
        for t in (1, 0):
            got = cupy.empty(513, dtype=cupy.float32)
            engine.recv(got, left, t, dl, call=None)
            _check(got.get(), np.full(513, left * 10 + t, dtype=np.float32), f"recv tag={t}")
    engine.barrier(next(seq), dl, call=None)


def _worker(rank, size, port, prefix, own_gpu=False):
    import cupy

    cupy.cuda.Device(rank if own_gpu else 0).use()
    engine, store = _engine(rank, size, port, prefix)
    try:
        _run_all(engine, rank, size)
    finally:
        engine.close()
        store.close()
    return type(engine).__name__


def _run(target, size, *args, timeout=110):
    """``target(rank, size, port, prefix, *args)`` on ``size`` spawned ranks that build
    their engines on a store hosted here; their ``RankResult``s."""
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=60)
    try:
        return run_local_ranks(
            target, size, master.port, f"t{size}", *args, init_group=False, timeout=timeout
        )
    finally:
        master.close()


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_every_collective_on_one_gpu(size):
    results = _run(_worker, size)
    # One rank alone takes NCCL (when cupy has it); ranks sharing the GPU take CUDA IPC.
    expected = "NcclEngine" if size == 1 and _nccl_available() else "CudaIpcEngine"
    for result in results:
        assert result.ok, result.describe()
        assert result.value == expected


def _nccl_available():
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", False))


@pytest.mark.skipif(
    cupy.cuda.runtime.getDeviceCount() < 2, reason="the multi-GPU NCCL path needs 2+ GPUs"
)
def test_every_collective_over_nccl_one_gpu_per_rank():
    size = min(4, cupy.cuda.runtime.getDeviceCount())
    results = _run(_worker, size, True)
    for result in results:
        assert result.ok, result.describe()
        assert result.value == "NcclEngine"


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def _watchdog_worker(rank, size, port, prefix):
    import cupy

    from distrib._reduce_op import ReduceOp
    from distrib.store import PrefixStore, TCPStore
    from distrib.transport.gpu._nccl import NcclEngine

    try:
        store = PrefixStore(prefix, TCPStore("127.0.0.1", port, is_master=False, timeout=30))
        engine = NcclEngine(store, 0, 1, 0, timeout=60)  # setup may take seconds
        engine.timeout = 0.3  # every later call must finish within 0.3 s
        buf = cupy.ones(1000, dtype=cupy.float32)
        engine.all_reduce(buf, ReduceOp.SUM, 1, time.monotonic() + 10, call=None)
        engine.wait_idle(time.monotonic() + 10)  # a normal call completes
        rate = cupy.cuda.Device().attributes["ClockRate"] * 1000
        cupy.RawKernel(_SPIN, "spin")((1,), (1,), (np.int64(int(1.5 * rate)),))
        # stuck behind the spin
        engine.all_reduce(buf, ReduceOp.SUM, 2, time.monotonic() + 10, call=None)
        try:
            engine.wait_idle(time.monotonic() + 10)
            status = "no error"
        except Exception as exc:
            status = f"{type(exc).__name__}: {exc}"
        engine.close()
        store.close()
        return status
    except BaseException:
        return traceback.format_exc()


@pytest.mark.skipif(not _nccl_available(), reason="cupy has no NCCL binding here")
def test_nccl_watchdog_aborts_a_late_operation():
    (result,) = _run(_watchdog_worker, 1, timeout=60)
    assert result.ok, result.describe()
    status = result.value
    assert status.startswith("DistTimeoutError"), status
    assert "aborted" in status


def _failure_worker(rank, size, port, prefix, scenario):
    import os

    import cupy

    from distrib._reduce_op import ReduceOp

    cupy.cuda.Device(0).use()
    engine, store = _engine(rank, size, port, prefix, timeout=20)
    buf = cupy.ones(100, dtype=cupy.float32)
    try:
        if rank == 1:
            if scenario == "peer exits":
                os._exit(0)
            if scenario == "mismatch":
                engine.broadcast(buf, 0, 1, time.monotonic() + 20, call=None)
            else:  # "timeout": never call, wait until rank 0 is done
                time.sleep(0.1)
                store.get("rank0-done")
            return "no error", 0.0
        t0 = time.monotonic()
        engine.all_reduce(buf, ReduceOp.SUM, 1, time.monotonic() + 1.5, call=None)
        return "no error", time.monotonic() - t0
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - t0 if rank == 0 else 0
    finally:
        if rank == 0:
            store.set("rank0-done", b"1")
        engine.abort("test over")
        engine.close()
        store.close()


@pytest.mark.parametrize(
    ("scenario", "error"),
    [
        ("timeout", "DistTimeoutError"),
        ("peer exits", "DistPeerLostError"),
        ("mismatch", "DistMismatchError"),
    ],
)
def test_failures_become_errors(scenario, error):
    rank0 = _run(_failure_worker, 2, scenario, timeout=60)[0]  # rank 1 may exit, or fail
    assert rank0.ok, rank0.describe()
    status, elapsed = rank0.value
    assert status.startswith(error), status
    assert "rank 0" in status
    if scenario == "peer exits":
        assert elapsed < 1.5, "a dead peer must be reported before the timeout"
