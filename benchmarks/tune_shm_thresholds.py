"""Measure the shared-memory engine's all-reduce thresholds, path against path.

Run ``python benchmarks/tune_shm_thresholds.py`` (wrap it in
``flock /tmp/distrib-bench.lock``). Ranks are forked processes talking
through the engine directly (no process group), so the table shows the
algorithms, not the API overhead. Columns, per message size (float32 sum):

- ``one-shot``: every rank reduces the whole buffer (one synchronisation);
- ``staged``: reduce-scatter/all-gather through the segment (two per step);
- ``single-copy``: inputs staged, results read straight out of the peers'
  buffers with ``process_vm_readv``;
- ``C step``: the staged step in C (``_shm_native.c``; 2 to 64 ranks).

The engine uses one-shot up to ``_ONE_SHOT_MAX`` (size x bytes), then the C
step below ``_NATIVE_MAX`` (where it was built), then single-copy (from
``_CMA_MIN`` without the C step); this table is where those numbers come from.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from _engine_ranks import run_engine_ranks

from distrib._reduce_op import ReduceOp
from distrib.bench._cli import parse_size
from distrib.transport.shm import _reduce as _shm_reduce

_PATHS = {
    # name: (one-shot max, single-copy min, C step allowed)
    "one-shot": (1 << 62, 1 << 62, False),
    "staged": (0, 1 << 62, False),
    "single-copy": (0, 0, False),
    "C step": (0, 1 << 62, True),
}


def _rank(eng: Any, rank: int, sizes: list[int], rounds: int) -> dict:
    res: dict[str, dict[int, list[float]]] = {name: {s: [] for s in sizes} for name in _PATHS}
    bufs = {size: np.zeros(size // 4, np.float32) for size in sizes}
    native = eng._native  # the C step (when built), shown as its own column
    # Rounds interleave the paths, so a noisy moment hits every column alike.
    for _ in range(rounds):
        for size in sizes:
            buf = bufs[size]
            reps = int(min(100, max(3, 2e8 // size)))
            for name, (one_shot, cma_min, use_native) in _PATHS.items():
                if name == "single-copy" and eng._reader is None:
                    continue
                if use_native and native is None:
                    continue
                _shm_reduce._ONE_SHOT_MAX, _shm_reduce._CMA_MIN = one_shot, cma_min
                _shm_reduce._NATIVE_MAX = 1 << 62
                eng._native = native if use_native else None
                for _ in range(2):
                    eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 60, call=None)
                eng.barrier(0, time.monotonic() + 60, call=None)
                t0 = time.perf_counter()
                for _ in range(reps):
                    eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 60, call=None)
                res[name][size].append((time.perf_counter() - t0) / reps)
    return res


def main(argv: list[str] | None = None) -> None:
    """Print all-reduce time per path and size (max over ranks)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--sizes", default="4K,16K,64K,256K,1M,4M,16M,64M,256M")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians shown")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    results = run_engine_ranks(_rank, args.nproc, sizes, args.rounds, timeout=600)
    n = args.nproc
    factor = 2 * (n - 1) / n
    print(
        f"all_reduce float32 sum, {n} ranks, engine only, median of {args.rounds} rounds; "
        "time us / busbw GB/s"
    )
    print(f"{'size':>8}" + "".join(f"{name:>24}" for name in _PATHS))
    for size in sizes:
        line = f"{size >> 10:>7}K"
        for name in _PATHS:
            per_round = [results[r][name][size] for r in results]
            if not per_round[0]:
                line += f"{'n/a':>24}"
                continue
            # a round's time is its slowest rank's; the column shows the median round
            t = float(np.median([max(ts) for ts in zip(*per_round, strict=True)]))
            line += f"{t * 1e6:>14.1f} {size / t * factor / 1e9:>8.2f}  "
        print(line)


if __name__ == "__main__":
    main()
