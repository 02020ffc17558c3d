"""Trace the road of ``distrib.all_reduce`` on a 4 KiB array, from the call to the engine.

Runs a group of 2 ranks on this machine (shared-memory engine by default;
``--transport zmq`` for the ZeroMQ ring), traces rank 0's third all_reduce
with ``sys.setprofile`` and prints the library modules visited, in order,
before the first call into an engine module (``distrib.transport.<kind>``).
Consecutive calls within one module count once: the list is the modules a
reader must open to follow the call.

    python benchmarks/trace_all_reduce.py [--transport shm|zmq] [--max-hops 4]

Exits with status 1 when more than ``--max-hops`` modules come before the engine.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

import distrib
from distrib.testing import run_local_ranks

VERBOSE = bool(os.environ.get("TRACE_VERBOSE"))
ENGINE_PREFIXES = ("distrib.transport.shm.", "distrib.transport.zmq.", "distrib.transport.hier.")


def _module_of(frame: Any) -> str:
    return frame.f_globals.get("__name__", "?")


def _trace_one(rank: int, world: int) -> list[str]:
    x = np.ones(1024, np.float32)  # 4 KiB
    for _ in range(2):  # warm up: engine built, caches filled
        distrib.all_reduce(x)
    road: list[str] = []
    done = False

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal done
        if done or event != "call":
            return
        mod = _module_of(frame)
        if not mod.startswith("distrib"):
            return
        if mod.startswith(ENGINE_PREFIXES):
            road.append(mod)
            done = True
            return
        if not road or road[-1] != mod:
            road.append(mod)
        if VERBOSE:
            road.append(f"    {frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        distrib.all_reduce(x)
    finally:
        sys.setprofile(None)
    distrib.barrier()
    return road


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["shm", "zmq"], default="shm")
    parser.add_argument("--max-hops", type=int, default=4)
    args = parser.parse_args()
    env = {"DISTRIB_TRANSPORT": args.transport}
    results = run_local_ranks(_trace_one, 2, timeout=120, env=env)
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit("\n".join(r.describe() for r in bad))
    road = results[0].value
    before = road[:-1] if road and road[-1].startswith(ENGINE_PREFIXES) else road
    print(f"all_reduce, 4 KiB float32, 2 ranks, DISTRIB_TRANSPORT={args.transport}")
    for i, mod in enumerate(road):
        tag = "engine" if mod.startswith(ENGINE_PREFIXES) else f"hop {i + 1}"
        print(f"  {tag:>7}  {mod}")
    print(f"modules before the engine: {len(before)} (at most {args.max_hops} allowed)")
    if len(before) > args.max_hops or not road or not road[-1].startswith(ENGINE_PREFIXES):
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
