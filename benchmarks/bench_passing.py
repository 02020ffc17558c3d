"""Round-trip latency of passing an array parent -> child -> ack through a queue.

Columns, measured side by side in one run (median of repeats, milliseconds):
  (a) distrib.multiprocessing.Queue, array already in shared memory
  (b) distrib.multiprocessing.Queue, private array (copied once into shared memory)
  (c) the standard multiprocessing.Queue (pickled copy)
  (d) torch.multiprocessing.Queue, tensor already in shared memory
  (e) torch.multiprocessing.Queue, private tensor (moved to shared memory by put)
Torch runs in another interpreter (``--peer-python``; default
``$DISTRIB_PEER_PYTHON``, else this one when it has torch); without one, columns
(d) and (e) are skipped with a note.

    python benchmarks/bench_passing.py            # the table
    python benchmarks/bench_passing.py --inline-sweep   # where inline pickling stops paying
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as std_mp
import statistics
import subprocess
import sys
import time

import numpy as np

import distrib.multiprocessing as dmp
import distrib.shm as shm
from distrib.bench._cli import default_peer_python
from distrib.multiprocessing._impl import _pickler

SIZES = {"1 KiB": 1 << 10, "1 MiB": 1 << 20, "64 MiB": 64 << 20, "512 MiB": 512 << 20}


def repeats_for(nbytes: int) -> int:
    """Fewer repeats for big arrays: a 512 MiB pickle takes most of a second."""
    if nbytes <= 1 << 20:
        return 200
    if nbytes <= 64 << 20:
        return 12
    return 4


def _echo(inbox, outbox) -> None:
    """Child: take each array, read one element (proves the mapping), ack its size."""
    while True:
        item = inbox.get()
        if item is None:
            return
        _ = item[-1]
        outbox.put(item.size)


# Already-shared arrays cost well under a millisecond at any size, so (a) and (d)
# take this many repeats everywhere: 4 repeats at 512 MiB left their medians noisy.
SHARED_REPEATS = 100


def _round_trips(ctx, make_array, nbytes: int, warmup: int = 2, repeats: int = 0) -> float:
    """Median seconds of put -> child get -> ack, with a fresh child per size."""
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_echo, args=(inbox, outbox), daemon=True)
    proc.start()
    times = []
    try:
        for i in range((repeats or repeats_for(nbytes)) + warmup):
            arr = make_array()
            start = time.perf_counter()
            inbox.put(arr)
            outbox.get(timeout=120)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            del arr
        inbox.put(None)
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return statistics.median(times)


def measure_distrib(nbytes: int) -> dict[str, float]:
    """Columns (a), (b), (c) for one size."""
    n = nbytes // 4
    ctx = dmp.get_context("fork")
    shared = shm.zeros(n, dtype=np.float32)
    private = np.zeros(n, dtype=np.float32)
    private[:] = 1  # touch the pages, as a real private array's would be
    out = {
        "a": _round_trips(ctx, lambda: shared, nbytes, repeats=SHARED_REPEATS),
        "b": _round_trips(ctx, lambda: private, nbytes),
        "c": _round_trips(std_mp.get_context("fork"), lambda: private, nbytes),
    }
    return out


_TORCH_SCRIPT = r"""
import json, statistics, sys, time
import torch
import torch.multiprocessing as tmp

def echo(inbox, outbox):
    while True:
        item = inbox.get()
        if item is None:
            return
        _ = item[-1]
        outbox.put(item.numel())

def round_trips(make, repeats, warmup=2):
    ctx = tmp.get_context("fork")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=echo, args=(inbox, outbox), daemon=True)
    proc.start()
    times = []
    for i in range(repeats + warmup):
        t = make()
        start = time.perf_counter()
        inbox.put(t)
        outbox.get(timeout=120)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        del t
    inbox.put(None)
    proc.join(60)
    return statistics.median(times)

sizes, repeats = json.loads(sys.argv[1]), json.loads(sys.argv[2])
torch.set_num_threads(1)
result = {}
for name, nbytes in sizes.items():
    n = nbytes // 4
    shared = torch.zeros(n).share_memory_()
    def private():
        t = torch.ones(n)  # a fresh private tensor each time: put() moves it to shm
        return t
    result[name] = {"d": round_trips(lambda: shared, repeats["shared"]),
                    "e": round_trips(private, repeats[name])}
    del shared
print(json.dumps(result))
"""


def measure_torch(peer_python: str, sizes: dict[str, int]) -> dict[str, dict[str, float]]:
    """Columns (d), (e) from torch in its own interpreter."""
    repeats = {name: repeats_for(nbytes) for name, nbytes in sizes.items()}
    repeats["shared"] = SHARED_REPEATS
    res = subprocess.run(
        [peer_python, "-c", _TORCH_SCRIPT, json.dumps(sizes), json.dumps(repeats)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if res.returncode != 0:
        raise RuntimeError(f"torch peer failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:10.3f}"


def print_table(rows: dict[str, dict[str, float]], have_torch: bool) -> None:
    cols = ["a", "b", "c"] + (["d", "e"] if have_torch else [])
    titles = {
        "a": "(a) distrib shared",
        "b": "(b) distrib private",
        "c": "(c) stdlib pickle",
        "d": "(d) torch shared",
        "e": "(e) torch private",
    }
    print("round-trip latency parent -> child -> ack, median ms (lower is better)")
    print(f"{'size':>8} | " + " | ".join(f"{titles[c]:>19}" for c in cols))
    print("-" * (11 + 22 * len(cols)))
    for name, row in rows.items():
        print(f"{name:>8} | " + " | ".join(f"{_fmt_ms(row.get(c)):>19}" for c in cols))
    a = [row["a"] for row in rows.values()]
    print(f"\n(a) flatness: slowest/fastest size = {max(a) / min(a):.2f}x")
    for name in ("64 MiB", "512 MiB"):
        row = rows.get(name)
        if row is None:
            continue
        if have_torch:
            print(
                f"{name}: (a)/(d) = {row['a'] / row['d']:.2f} (target <= 1)   "
                f"(b)/(e) = {row['b'] / row['e']:.2f} (target <= 1)"
            )
        print(f"{name}: (c)/(b) = {row['c'] / row['b']:.1f}x (target >= 3 at 64 MiB)")


def inline_sweep() -> None:
    """Private arrays: inline pickle vs copy into shared memory, by size."""
    ctx = dmp.get_context("fork")
    print("private array round trip, median us: inline pickle vs shared-memory copy")
    print(f"{'bytes':>9} | {'inline':>9} | {'shm copy':>9}")
    for nbytes in [1 << k for k in range(10, 22)]:
        arr = np.ones(nbytes // 8)
        results = []
        for threshold in (1 << 40, 0):
            _pickler._threshold_cache.value = threshold
            results.append(_round_trips(ctx, lambda arr=arr: arr, 1 << 20))
        print(f"{nbytes:>9} | {results[0] * 1e6:9.1f} | {results[1] * 1e6:9.1f}")
    _pickler._threshold_cache.value = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peer-python",
        default=None,
        help="interpreter with torch for columns (d), (e) (default: $DISTRIB_PEER_PYTHON, "
        "else this one when it has torch)",
    )
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help="comma-separated subset of: " + ", ".join(SIZES)
    )
    parser.add_argument(
        "--inline-sweep", action="store_true", help="measure the inline-pickle threshold instead"
    )
    args = parser.parse_args(argv)
    if args.inline_sweep:
        inline_sweep()
        return
    sizes = {}
    for name in args.sizes.split(","):
        name = name.strip()
        if name not in SIZES:
            parser.error(f"unknown size {name!r}; choose from {', '.join(SIZES)}")
        sizes[name] = SIZES[name]
    peer = args.peer_python or default_peer_python()
    torch_rows: dict[str, dict[str, float]] = {}
    if peer is None:
        print("note: no torch interpreter (--peer-python); columns (d) and (e) skipped")
    else:
        torch_rows = measure_torch(peer, sizes)
    rows = {}
    for name, nbytes in sizes.items():
        rows[name] = measure_distrib(nbytes) | torch_rows.get(name, {})
    print_table(rows, bool(torch_rows))


if __name__ == "__main__":
    sys.exit(main())
