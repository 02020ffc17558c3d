"""What each rank runs for ``distrib-bench``: time one collective over a list of sizes.

Timing follows nccl-tests: warm up, barrier, run ``iters`` back-to-back calls,
take this rank's mean, and report the maximum over ranks (the slowest rank
bounds the collective).

Each plan step may carry ``buffers``: per size, how many buffer sets the rank
cycles through (``distrib.bench._rotation.rotation_count``; 1 reuses one set).
Every set is written once before timing, so no page fault lands in the timed
loop; the two warm-up calls use the last sets and the timed calls start at the
first, so each timed call meets buffers last touched ``sets - 1`` calls ago.
The gloo and mpi4py scripts (``_peers.py``) follow the same steps.
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
    # Zeros, written (np.zeros may map untouched pages, faulted in on first use): repeated
    # in-place sums stay finite (ones would double up to inf).
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        block = max(1, count // n)
        return _written(block * n, dtype), _written(block, dtype)
    return (_written(count, dtype),)


def _written(count: int, dtype: np.dtype) -> Any:
    a = np.empty(count, dtype)
    a.fill(0)
    return a


def time_op(
    op: str, sizes: list[int], dtype: str, buffers: list[int] | None = None, warmup: int = 2
) -> list[tuple[int, float]]:
    """(size, seconds per call) for each size; runs inside an initialized group.

    ``buffers[i]`` buffer sets rotate at ``sizes[i]`` (default one set each).
    """
    import distrib as dist

    n, r = dist.get_world_size(), dist.get_rank()
    dt = np.dtype(dtype)
    out = []
    for nbytes, sets in zip(sizes, buffers or [1] * len(sizes), strict=True):
        calls = [_call(dist, op, _buffers(op, nbytes, n, dt), n, r) for _ in range(sets)]
        iters = iterations(nbytes)
        for j in range(warmup):
            calls[(sets - warmup + j) % sets]()
        dist.barrier()
        start = time.perf_counter()
        for i in range(iters):
            calls[i % sets]()
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
        out = np.zeros_like(big)  # written now: no page fault in the timing
        return lambda: dist.all_to_all_single(out, big)
    if op == "gather":
        outs = [np.zeros_like(small) for _ in range(n)] if r == 0 else None
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
            results.append(time_op(step["op"], step["sizes"], step["dtype"], step.get("buffers")))
        finally:
            _zmq_engine.ALLREDUCE_SMALL_MAX = saved
    return results
