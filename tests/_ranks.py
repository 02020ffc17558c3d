"""Run forked ranks that report ``(rank, status, value)`` on a queue; collect and reap them."""

from __future__ import annotations

import queue
import time
from typing import Any


def collect_ranks(procs: list[Any], out: Any, n: int, budget: float) -> dict[int, tuple[str, Any]]:
    """Start ``procs``, gather up to ``n`` results from ``out`` within ``budget`` seconds,
    then join them (killing any still alive) and close the queue."""
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    end = time.monotonic() + budget
    try:
        while len(results) < n and time.monotonic() < end:
            if all(not p.is_alive() for p in procs) and out.empty():
                time.sleep(0.2)  # the last item may still be in the pipe
                if out.empty():
                    break
            try:
                rank, status, value = out.get(timeout=0.2)
            except queue.Empty:
                continue
            results[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=max(0.1, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        out.close()
        out.join_thread()
    return results


def failure_of(call: Any) -> tuple[str, Any, float] | None:
    """Run ``call()``; ``None`` if it returns, else (exception class name, its ``peer``,
    seconds until it raised): what the fault scenarios report back."""
    start = time.monotonic()
    try:
        call()
    except Exception as exc:
        return type(exc).__name__, getattr(exc, "peer", None), time.monotonic() - start
    return None
