"""Forked ranks driving one shared-memory engine directly (no process group).

For the benchmarks that compare the engine's own algorithms
(``tune_shm_thresholds.py``, ``bench_shm_stores.py``): each rank connects to
the engine through a ``FileStore`` in a temporary directory, runs the
benchmark's function, and sends its result back over a queue.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from distrib.store._file_store import FileStore
from distrib.transport.shm._rendezvous import connect_local

__all__ = ["run_engine_ranks"]


def _rank(path: str, rank: int, n: int, fn: Callable[..., Any], args: tuple, out: Any) -> None:
    eng = connect_local(FileStore(path), "bench", rank, n, list(range(n)), time.monotonic() + 60)
    assert eng is not None
    try:
        out.put((rank, fn(eng, rank, *args)))
    finally:
        eng.close()


def run_engine_ranks(
    fn: Callable[..., Any], nproc: int, *args: Any, timeout: float = 900.0
) -> dict[int, Any]:
    """Run ``fn(engine, rank, *args)`` in ``nproc`` forked ranks (``engine``: a
    ``ShmEngine``); return {rank: what ``fn`` returned}."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank, args=(path, r, nproc, fn, args, out)) for r in range(nproc)
        ]
        for p in procs:
            p.start()
        try:
            return dict(out.get(timeout=timeout) for _ in procs)
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
