"""Run a function on N local ranks (spawned processes) in one process group.

Used by the test suite and ``distrib-bench``: the parent hosts the TCPStore
(port 0), each child joins the default group through it, runs
``fn(rank, world_size, *args)`` and reports its return value or its exception
through a queue. Everything is bounded: children that outlive ``timeout`` are
killed, and a child that dies without reporting is reported by its signal name.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RankResult", "run_local_ranks"]


@dataclass
class RankResult:
    """What one rank reported: ``value`` or ``error`` (+ ``trace``), or its exit signal."""

    rank: int
    value: Any = None
    error: BaseException | None = None
    trace: str = ""
    exitcode: int | None = None
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode in (0, None) and self.trace == ""

    def describe(self) -> str:
        if self.error is not None or self.trace:
            return f"rank {self.rank} raised {self.error!r}\n{self.trace}"
        if self.exitcode and self.exitcode < 0:
            return f"rank {self.rank} died by {signal.Signals(-self.exitcode).name}"
        return f"rank {self.rank} exit code {self.exitcode}"


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    out: Any,
    env: Mapping[str, str],
    group_timeout: float,
) -> None:
    os.environ.update(env)
    from ..comm import _api
    from ..store import TCPStore

    start = time.monotonic()
    try:
        store = TCPStore("127.0.0.1", port, timeout=group_timeout + 30)
        _api.init_process_group(
            "auto", store=store, rank=rank, world_size=world_size, timeout=group_timeout
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            _api.destroy_process_group()
            store.close()
        out.put((rank, value, None, "", time.monotonic() - start))
    except BaseException as exc:
        trace = traceback.format_exc()
        try:
            out.put((rank, None, exc, trace, time.monotonic() - start))
        except Exception:
            out.put((rank, None, None, trace, time.monotonic() - start))


def run_local_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    group_timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; one result each."""
    from ..store import TCPStore

    ctx = mp.get_context("spawn")
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=timeout, wait_for_workers=False)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, r, world_size, master.port, args, out, dict(env or {}), group_timeout),
            daemon=True,
        )
        for r in range(world_size)
    ]
    results: dict[int, RankResult] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(results) < world_size and time.monotonic() < deadline:
            try:
                rank, value, error, trace, elapsed = out.get(timeout=0.1)
                results[rank] = RankResult(rank, value, error, trace, None, elapsed)
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode is not None and r not in results
                ]
                # A rank that exited without reporting (killed): give its queue a moment.
                for r in dead:
                    if procs[r].exitcode != 0:
                        results[r] = RankResult(r, exitcode=procs[r].exitcode)
    finally:
        for p in procs:
            p.join(max(0.1, min(5.0, timeout)))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        out.close()
        out.join_thread()
        master.close()
    for r, p in enumerate(procs):
        res = results.setdefault(r, RankResult(r, trace="no report before the harness timeout"))
        res.exitcode = p.exitcode
    return [results[r] for r in range(world_size)]
