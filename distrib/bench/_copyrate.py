"""The physical reference for ``distrib-bench``: one process copying memory.

The copy rate is bytes copied per second by a single process (``np.copyto``
between two warm buffers of the message size), measured in the same run as
the collectives so the shared-memory engine's busbw can be read against what
the machine's memory can do (the shared-memory all-reduce aims at 40% of it or more at 256 MiB).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

__all__ = ["copy_rate_column", "copy_seconds"]


def copy_seconds(nbytes: int, budget_bytes: float = 1.5e9, lo: int = 5, hi: int = 300) -> float:
    """Mean seconds to copy ``nbytes`` between two warm buffers (same budget as the ranks)."""
    src = np.ones(max(1, nbytes), np.uint8)
    dst = np.empty_like(src)
    reps = int(min(hi, max(lo, budget_bytes // max(nbytes, 1))))
    for _ in range(2):
        np.copyto(dst, src)
    best = float("inf")
    for _ in range(3):  # best of three rounds: this is a ceiling, not a typical case
        t0 = time.perf_counter()
        for _ in range(reps):
            np.copyto(dst, src)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def copy_rate_column(args: Any, plan: list[dict[str, Any]]) -> list[list[Any]]:
    """``distrib-bench`` column: for every op and size, the time to copy ``size`` bytes."""
    times = {s: copy_seconds(s) for s in sorted({s for step in plan for s in step["sizes"]})}
    return [[step["op"], [[s, times[s]] for s in step["sizes"]]] for step in plan]
