"""What each rank runs for ``distrib-bench``: time one collective over a list of sizes.

Timing follows nccl-tests: warm up, barrier, run ``iters`` back-to-back calls,
take this rank's mean, and report the maximum over ranks (the slowest rank
bounds the collective).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

__all__ = ["OPS", "bus_factor", "iterations", "time_op"]

OPS = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "gather",
    "scatter",
    "barrier",
)


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' busbw / algbw ratio for ``op`` on ``n`` ranks."""
    if n == 1:
        return 1.0
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        return (n - 1) / n
    return 1.0


def iterations(nbytes: int, budget_bytes: float = 1.5e9, lo: int = 5, hi: int = 300) -> int:
    """Enough iterations to move about ``budget_bytes`` (bounded)."""
    return int(min(hi, max(lo, budget_bytes // max(nbytes, 1))))


def _buffers(op: str, nbytes: int, n: int, dtype: np.dtype) -> tuple[Any, ...]:
    """Arrays for one call; ``nbytes`` is nccl-tests' size (the total for gathers/scatters)."""
    count = max(1, nbytes // dtype.itemsize)
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        block = max(1, count // n)
        return np.zeros(block * n, dtype), np.zeros(block, dtype)
    # Zeros: repeated in-place sums stay finite (ones would double up to inf).
    return (np.zeros(count, dtype),)


def time_op(op: str, sizes: list[int], dtype: str, warmup: int = 2) -> list[tuple[int, float]]:
    """(size, seconds per call) for each size; runs inside an initialized group."""
    import distrib as dist

    n, r = dist.get_world_size(), dist.get_rank()
    dt = np.dtype(dtype)
    out = []
    for nbytes in sizes:
        bufs = _buffers(op, nbytes, n, dt)
        call = _call(dist, op, bufs, n, r)
        iters = iterations(nbytes)
        for _ in range(warmup):
            call()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            call()
        mine = np.array([(time.perf_counter() - start) / iters])
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        out.append((nbytes, float(mine[0])))
    return out


def _call(dist: Any, op: str, bufs: tuple[Any, ...], n: int, r: int) -> Any:
    if op == "all_reduce":
        return lambda: dist.all_reduce(bufs[0])
    if op == "broadcast":
        return lambda: dist.broadcast(bufs[0], src=0)
    if op == "reduce":
        return lambda: dist.reduce(bufs[0], dst=0)
    if op == "barrier":
        return lambda: dist.barrier()
    big, small = bufs
    if op == "all_gather":
        return lambda: dist.all_gather_into_tensor(big, small)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(small, big)
    if op == "all_to_all":
        out = np.empty_like(big)
        return lambda: dist.all_to_all_single(out, big)
    if op == "gather":
        outs = [np.empty_like(small) for _ in range(n)] if r == 0 else None
        return lambda: dist.gather(small, outs, dst=0)
    if op == "scatter":
        ins = [np.ones_like(small) for _ in range(n)] if r == 0 else None
        return lambda: dist.scatter(small, ins, src=0)
    raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")


def bench_rank(rank: int, world_size: int, plan: list[dict[str, Any]]) -> list[Any]:
    """Entry point on each rank: run every step of ``plan`` (op, sizes, dtype, algo)."""
    from ..transport.zmq import _engine as _zmq_engine

    results = []
    for step in plan:
        algo = step.get("algo", "auto")
        saved = _zmq_engine.ALLREDUCE_SMALL_MAX
        if algo == "ring":
            _zmq_engine.ALLREDUCE_SMALL_MAX = -1
        elif algo == "rd":
            _zmq_engine.ALLREDUCE_SMALL_MAX = 1 << 62
        try:
            results.append(time_op(step["op"], step["sizes"], step["dtype"]))
        finally:
            _zmq_engine.ALLREDUCE_SMALL_MAX = saved
    return results
