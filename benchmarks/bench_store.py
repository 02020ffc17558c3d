"""Store latency: one client's ``set``/``get``/``add`` round trips and ``new_group`` at world 2.

The server runs in this process (as rank 0 or the launcher hosts it); the client
runs in a spawned process so the two do not share an interpreter lock. Medians
of many round trips, microseconds; ``new_group`` is timed on rank 0 of a
world-2 job (every rank creates the group, the median of ``--groups`` calls).

    python benchmarks/bench_store.py [--ops 2000] [--groups 30]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _client(port: int, ops: int, out: mp.Queue) -> None:
    from distrib.comm import TCPStore

    store = TCPStore("127.0.0.1", port, timeout=30)
    store.set("warm", b"x")
    value = b"v" * 100
    times: dict[str, list[float]] = {"set (100 B)": [], "get (100 B)": [], "add": []}
    for i in range(ops):
        t0 = time.perf_counter()
        store.set(f"k{i % 64}", value)
        t1 = time.perf_counter()
        store.get(f"k{i % 64}")
        t2 = time.perf_counter()
        store.add("n", 1)
        t3 = time.perf_counter()
        times["set (100 B)"].append(t1 - t0)
        times["get (100 B)"].append(t2 - t1)
        times["add"].append(t3 - t2)
    out.put({k: statistics.median(v) * 1e6 for k, v in times.items()})
    store.close()


def _groups(rank: int, world: int, groups: int) -> float:
    import distrib.comm as dist

    times = []
    for _ in range(groups):
        dist.barrier()
        t0 = time.perf_counter()
        dist.new_group([0, 1])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=2000, help="round trips per operation")
    p.add_argument("--groups", type=int, default=30, help="new_group calls")
    args = p.parse_args(argv)
    from distrib.comm import TCPStore
    from distrib.testing._ranks import run_local_ranks

    ctx = mp.get_context("spawn")
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=30)
    out = ctx.Queue()
    proc = ctx.Process(target=_client, args=(master.port, args.ops, out))
    proc.start()
    rows = out.get(timeout=300)
    proc.join(30)
    master.close()
    results = run_local_ranks(_groups, 2, args.groups, timeout=300)
    rows["new_group (world 2)"] = results[0].value
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| operation | median us |")
    print("|---|---:|")
    for name, us in rows.items():
        print(f"| {name} | {us:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
