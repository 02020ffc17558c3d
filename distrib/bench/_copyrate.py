"""The physical reference for ``distrib-bench``: processes copying memory.

Two measurements, both with ``np.copyto``:

* ``copy_rate_column``: the ``memcpy 1 proc`` column, the mean time for one
  process to copy ``size`` bytes (best of three rounds), rotating through
  source/destination pairs like the ranks rotate their buffers. Its ``algbw``
  is bytes *copied* per second.
* ``measure_copy_rates``: the machine's memory copy rate for the header, with
  buffers of ``2 x LLC`` each (beyond the last-level cache), run once by one
  process and once by ``world`` processes copying at the same time (about
  ``MEASURE_SECONDS`` each). These rates count bytes *read plus written*: a
  copy of ``N`` bytes counts ``2 N``. The ``world``-process figure is the sum
  of each process's ``2 N x copies / seconds``.

The memory-traffic fraction of an all-reduce (``% of memory limit`` in the
table) compares the traffic a single-copy all-reduce needs with that
aggregate rate::

    traffic  = 3 x world x size            # each rank reads its input, the reduced
                                           # result is written, and read back
    fraction = (traffic / time) / aggregate_copy_rate(world processes, read+written)

100% would mean the all-reduce moves its data as fast as ``world`` processes
can stream memory; the figure is read against the same kind of bytes (reads
plus writes as the program sees them) on both sides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._rotation import BufferMode, memory_budget, rotation_count

__all__ = [
    "MEASURE_SECONDS",
    "CopyRates",
    "copy_rate_column",
    "copy_seconds",
    "measure_bytes",
    "measure_copy_rates",
    "memory_fraction",
]

#: Length of each header measurement (one process, then ``world`` at once).
MEASURE_SECONDS = 0.5
# Rounds each copy rate is measured in; the best counts.
_ROUNDS = 3


def copy_seconds(
    nbytes: int, sets: int = 1, budget_bytes: float = 1.5e9, lo: int = 5, hi: int = 300
) -> float:
    """Mean seconds to copy ``nbytes``, cycling through ``sets`` source/destination pairs.

    The pairs are written once first (so no page fault lands in the timing) and
    the cycle runs on across rounds, so with ``sets > 1`` each copy meets pairs
    last touched ``sets - 1`` copies earlier, as the ranks' collectives do.
    """
    size = max(1, nbytes)
    srcs = [np.ones(size, np.uint8) for _ in range(sets)]
    dsts = [np.zeros(size, np.uint8) for _ in range(sets)]
    reps = int(min(hi, max(lo, budget_bytes // size)))
    for j in range(2):  # warm-up on the last pairs; timing starts at the first
        k = (sets - 2 + j) % sets
        np.copyto(dsts[k], srcs[k])
    best, i = float("inf"), 0
    for _ in range(3):  # best of three rounds: this is a ceiling, not a typical case
        t0 = time.perf_counter()
        for _ in range(reps):
            np.copyto(dsts[i % sets], srcs[i % sets])
            i += 1
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def copy_rate_column(args: Any, plan: list[dict[str, Any]]) -> list[list[Any]]:
    """``distrib-bench`` column: for every op and size, the time to copy ``size`` bytes.

    In rotate mode the pairs (``2 x size`` bytes each) rotate by the ranks' rule.
    """
    sizes = sorted({s for step in plan for s in step["sizes"]})
    times = {}
    head = args.machine  # distrib.bench._cli.Header
    hw = head.machine
    for s in sizes:
        sets = 1
        if head.mode is BufferMode.ROTATE:
            sets = rotation_count(2 * s, hw.llc_bytes, hw.memory_bytes, 1)
        times[s] = copy_seconds(s, sets)
    return [[step["op"], [[s, times[s]] for s in step["sizes"]]] for step in plan]


@dataclass(frozen=True)
class CopyRates:
    """The header's copy rates, in bytes read plus written per second."""

    nbytes: int  # size of each source and each destination buffer
    one: float  # one process
    procs: int  # processes of the concurrent measurement (the world size)
    concurrent: float  # all of them at once, summed


def measure_bytes(llc: int, memory: int, world: int) -> int:
    """Size of each copy buffer: ``2 x llc`` (beyond the cache), within the memory budget."""
    return max(1 << 20, min(2 * llc, memory_budget(memory, world) // 2))


# Each child: allocate and touch both buffers, say "ready", wait for "go" on stdin, copy
# for the given seconds, print one JSON line. Only numpy is imported there.
_CHILD = r"""
import json, sys, time
import numpy as np
nbytes, seconds = int(sys.argv[1]), float(sys.argv[2])
src = np.ones(nbytes, np.uint8); dst = np.zeros(nbytes, np.uint8)
np.copyto(dst, src)
print("ready", flush=True)
sys.stdin.readline()
copies, t0 = 0, time.perf_counter()
while True:
    np.copyto(dst, src); copies += 1
    el = time.perf_counter() - t0
    if el >= seconds:
        break
print(json.dumps({"copies": copies, "seconds": el}), flush=True)
"""


def _concurrent_rate(procs: int, nbytes: int, seconds: float, timeout: float) -> float:
    """Sum over ``procs`` processes copying at once of ``2 x nbytes x copies / seconds``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children: list[subprocess.Popen[str]] = []

    def kill_all() -> None:
        for c in children:
            if c.poll() is None:
                c.kill()

    watchdog = threading.Timer(timeout, kill_all)  # a blocked readline ends at EOF
    watchdog.start()
    try:
        for _ in range(procs):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", _CHILD, str(nbytes), str(seconds)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        for c in children:
            assert c.stdout is not None
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError("copy-rate process failed to start")
        for c in children:  # all have their buffers: start them together
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        total = 0.0
        for c in children:
            out, err = c.communicate()
            if c.returncode != 0:
                raise RuntimeError(f"copy-rate process failed: {err[-500:]}")
            res = json.loads(out.strip().splitlines()[-1])
            total += 2 * nbytes * res["copies"] / res["seconds"]
        return total
    finally:
        watchdog.cancel()
        kill_all()
        for c in children:
            c.wait()
            for f in (c.stdin, c.stdout, c.stderr):
                if f is not None:
                    f.close()


def measure_copy_rates(
    llc: int, memory: int, world: int, seconds: float = MEASURE_SECONDS, timeout: float = 120.0
) -> CopyRates:
    """One process's and ``world`` processes' copy rate, buffers beyond the cache.

    Each is the best of ``_ROUNDS`` short rounds (a ceiling: a virtual machine's memory
    speed swings from second to second), and ``world`` processes are credited at least
    what one achieves (the others could have stayed idle).
    """
    nbytes = measure_bytes(llc, memory, world)
    share = seconds / _ROUNDS
    one = max(_concurrent_rate(1, nbytes, share, timeout) for _ in range(_ROUNDS))
    many = one
    if world > 1:
        many = max(one, *(_concurrent_rate(world, nbytes, share, timeout) for _ in range(_ROUNDS)))
    return CopyRates(nbytes, one, world, many)


def memory_fraction(size: int, seconds: float, world: int, aggregate_rate: float) -> float:
    """A single-copy all-reduce's share of the memory limit: ``(3 x world x size / t) / rate``."""
    return 3 * world * size / seconds / aggregate_rate
