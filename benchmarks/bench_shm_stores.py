"""Large shared-memory all-reduces with ordinary stores, streaming stores, and distrib's choice.

Run ``python benchmarks/bench_shm_stores.py`` (wrap it in
``flock /tmp/distrib-bench.lock``). Ranks are forked processes driving the
engine directly, as in ``tune_shm_thresholds.py``. For each size (float32
sum, buffers rotating through at least twice the last-level cache) the
rounds interleave three settings of how a rank writes the data its peers
read next (distrib/transport/shm/_stores.py):

- ``cached``: ordinary stores;
- ``streaming``: non-temporal stores, straight to memory;
- ``chosen``: what the engine does by default: it measures both and uses
  the cheaper (one chooser per size, kept across the rounds as in a job).

Which of the first two wins depends on the machine's state, not its model:
on a virtual machine whose virtual CPUs the host moves between core
complexes, ordinary stores into lines a peer just read can become several
times slower for minutes at a time. The ``cached/streaming`` columns show
the ratio's lowest and highest round, so a run that saw both states says so.

``--watch N`` instead takes N samples a few seconds apart. Each reads the
state off an all-reduce of the last-level cache's size with each kind of
store, then times small all-reduces (4 KiB, 64 KiB, 256 KiB: the one-shot
path, which always uses ordinary stores), to show what the state costs them.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from _engine_ranks import run_engine_ranks

from distrib._machine import machine
from distrib._reduce_op import ReduceOp
from distrib.bench._cli import parse_size
from distrib.transport.shm._stores import StoreChooser, StoreKind

_SETTINGS = ("cached", "streaming", "chosen")


def _choosers(name: str) -> tuple[StoreChooser, StoreChooser]:
    """(C step, single-copy path) choosers for one setting."""
    fixed = {"cached": StoreKind.CACHED, "streaming": StoreKind.STREAMING}.get(name)
    return StoreChooser(True, fixed=fixed), StoreChooser(True, fixed=fixed)


def _rank(eng: Any, rank: int, sizes: list[int], rounds: int) -> dict | None:
    pipe = eng._pipe
    if pipe.native is None:
        return None
    res: dict[str, dict[int, list[float]]] = {s: {size: [] for size in sizes} for s in _SETTINGS}
    llc = machine().llc_bytes
    for size in sizes:
        bufs = [np.ones(size // 4, np.float32) for _ in range(max(2, -(-2 * llc // size)))]
        choosers = {s: _choosers(s) for s in _SETTINGS}  # "chosen" learns across rounds
        reps = int(min(50, max(4, 4e8 // size)))
        i = 0
        for name in _SETTINGS:  # warm-up: the pages of every buffer touched
            pipe.native_stores, pipe.pull_stores = choosers[name]
            for buf in bufs:
                eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 60, call=None)
        # Rounds interleave the settings, so a change of the machine's state
        # falls on all three columns alike.
        for _ in range(rounds):
            for name in _SETTINGS:
                for buf in bufs:
                    buf.fill(1.0)  # sums double per call: start every round from 1
                pipe.native_stores, pipe.pull_stores = choosers[name]
                eng.barrier(0, time.monotonic() + 60, call=None)
                t0 = time.perf_counter()
                for _ in range(reps):
                    buf = bufs[i % len(bufs)]
                    i += 1
                    eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 60, call=None)
                res[name][size].append((time.perf_counter() - t0) / reps)
    return res


_SMALL = (4 << 10, 64 << 10, 256 << 10)


def _watch_rank(eng: Any, rank: int, samples: int, every_s: float) -> list[dict]:
    """Per sample: the big all-reduce's cached/streaming time ratio, small all-reduce times."""
    pipe = eng._pipe
    if pipe.native is None:
        return []
    big = [np.ones(machine().llc_bytes // 4, np.float32) for _ in range(3)]
    small = {size: [np.ones(size // 4, np.float32) for _ in range(64)] for size in _SMALL}
    rows = []
    for _ in range(samples):
        row: dict[Any, float] = {}
        for name in ("cached", "streaming"):
            pipe.native_stores, pipe.pull_stores = _choosers(name)
            for buf in big:
                buf.fill(1.0)
            eng.barrier(0, time.monotonic() + 60, call=None)
            t0 = time.perf_counter()
            for i in range(6):
                eng.all_reduce(big[i % 3], ReduceOp.SUM, 0, time.monotonic() + 60, call=None)
            row[name] = (time.perf_counter() - t0) / 6
        for size, bufs in small.items():
            for buf in bufs:
                buf.fill(1.0)
            reps = 300 if size <= (64 << 10) else 150
            eng.barrier(0, time.monotonic() + 60, call=None)
            t0 = time.perf_counter()
            for i in range(reps):
                eng.all_reduce(bufs[i % 64], ReduceOp.SUM, 0, time.monotonic() + 60, call=None)
            row[size] = (time.perf_counter() - t0) / reps
        rows.append(row)
        time.sleep(every_s)
    return rows


def _watch(nproc: int, samples: int, every_s: float) -> None:
    results = run_engine_ranks(_watch_rank, nproc, samples, every_s)
    if not results[0]:
        print("streaming stores need the C library (a C compiler); nothing to compare")
        return
    big = machine().llc_bytes >> 20
    print(
        f"# {nproc} ranks, engine only, {samples} samples {every_s:g} s apart; state: a "
        f"{big} MiB all-reduce's time with ordinary / with streaming stores (> 1.5: slow "
        "state); small all-reduces: one-shot path, us"
    )
    print(f"# machine: {machine().describe()}")
    head = f"{'sample':>6} | {'cached/streaming':>16} |" + "".join(
        f"{f'{size >> 10} KiB us':>12}" for size in _SMALL
    )
    print(head)
    print("-" * len(head))
    for k in range(samples):
        rows = [results[r][k] for r in results]  # a sample's time is its slowest rank's
        state = max(row["cached"] for row in rows) / max(row["streaming"] for row in rows)
        line = f"{k:>6} | {state:>16.2f} |"
        line += "".join(f"{max(row[size] for row in rows) * 1e6:>12.1f}" for size in _SMALL)
        print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Print all-reduce time per setting and size (median round, max over ranks)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--sizes", default="1M,4M,16M,32M,64M")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds; medians shown")
    ap.add_argument(
        "--watch", type=int, default=0, metavar="N", help="take N samples of the state instead"
    )
    ap.add_argument("--every", type=float, default=2.0, help="seconds between --watch samples")
    args = ap.parse_args(argv)
    if args.watch:
        _watch(args.nproc, args.watch, args.every)
        return
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    results = run_engine_ranks(_rank, args.nproc, sizes, args.rounds)
    if any(r is None for r in results.values()):
        print("streaming stores need the C library (a C compiler); nothing to compare")
        return
    n = args.nproc
    factor = 2 * (n - 1) / n
    print(
        f"# all_reduce float32 sum, {n} ranks, engine only, median of {args.rounds} "
        "interleaved rounds; time us (busbw GB/s)"
    )
    print(f"# machine: {machine().describe()}")
    head = f"{'size':>6} |" + "".join(f"{s:>20}" for s in _SETTINGS)
    head += f" | {'cached/streaming min..max':>26}"
    print(head)
    print("-" * len(head))
    for size in sizes:
        # a round's time is its slowest rank's
        rounds = {
            s: [max(ts) for ts in zip(*(results[r][s][size] for r in results), strict=True)]
            for s in _SETTINGS
        }
        line = f"{size >> 20:>5}M |"
        for s in _SETTINGS:
            t = float(np.median(rounds[s]))
            line += f"{t * 1e6:>11.0f} ({size / t * factor / 1e9:>5.2f})"
        ratios = [c / s for c, s in zip(rounds["cached"], rounds["streaming"], strict=True)]
        line += f" | {min(ratios):>12.2f} .. {max(ratios):<11.2f}"
        print(line)
    print(
        "# cached/streaming > 1: ordinary stores were the slower kind in that round; "
        "'chosen' should follow the faster"
    )


if __name__ == "__main__":
    main()
