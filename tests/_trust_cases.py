"""Mismatch and kill-a-rank scenarios shared by tests/test_collective_trust.py and
benchmarks/campaign_collectives.py (the campaign runs them at 10x the test counts).

Each mismatch case is a function ``(rank, group) -> (call, outputs)``: ``call`` runs the
rank's (mismatched) call, ``outputs`` are the arrays that call may write, which must
come back untouched. Rank 1 is the odd one; at world 3 rank 2 sides with rank 0.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import distrib as dist

Case = Callable[[int, Any], tuple[Callable[[], Any], list[np.ndarray]]]


def _filled(n: int, dtype: Any, rank: int) -> np.ndarray:
    return np.full(n, 100 + rank, dtype)


def _kind(rank: int, g: Any):
    a = _filled(1024, np.float32, rank)
    if rank == 1:
        return (lambda: dist.broadcast(a, src=0, group=g)), [a]
    return (lambda: dist.all_reduce(a, group=g)), [a]


def _size(rank: int, g: Any):
    a = _filled(1025 if rank == 1 else 1024, np.float32, rank)
    return (lambda: dist.all_reduce(a, group=g)), [a]


def _size_large(rank: int, g: Any):
    a = _filled((1 << 20) if rank == 1 else 1000, np.float32, rank)  # different paths
    return (lambda: dist.all_reduce(a, group=g)), [a]


def _dtype(rank: int, g: Any):
    a = _filled(1024, np.float64 if rank == 1 else np.float32, rank)
    return (lambda: dist.all_reduce(a, group=g)), [a]


def _reduce_op(rank: int, g: Any):
    a = _filled(1024, np.float32, rank)
    op = dist.ReduceOp.MAX if rank == 1 else dist.ReduceOp.SUM
    return (lambda: dist.all_reduce(a, op=op, group=g)), [a]


def _root_broadcast(rank: int, g: Any):
    a = _filled(1024, np.float32, rank)
    return (lambda: dist.broadcast(a, src=1 if rank == 1 else 0, group=g)), [a]


def _root_scatter(rank: int, g: Any):
    n = dist.get_world_size(g)
    src = 1 if rank == 1 else 0
    out = _filled(256, np.float32, rank)
    parts = [_filled(256, np.float32, 10 + q) for q in range(n)] if rank == src else None
    return (lambda: dist.scatter(out, parts, src=src, group=g)), [out]


def _root_reduce(rank: int, g: Any):
    a = _filled(1024, np.float32, rank)
    return (lambda: dist.reduce(a, dst=1 if rank == 1 else 0, group=g)), [a]


def _root_gather(rank: int, g: Any):
    n = dist.get_world_size(g)
    dst = 1 if rank == 1 else 0
    a = _filled(256, np.float32, rank)
    outs = [_filled(256, np.float32, 50) for _ in range(n)] if rank == dst else None
    return (lambda: dist.gather(a, outs, dst=dst, group=g)), [a, *(outs or [])]


def _broadcast_vs_reduce(rank: int, g: Any):
    a = _filled(1024, np.float32, rank)
    if rank == 1:
        return (lambda: dist.reduce(a, dst=0, group=g)), [a]
    return (lambda: dist.broadcast(a, src=0, group=g)), [a]


def _gather_vs_scatter(rank: int, g: Any):
    n = dist.get_world_size(g)
    a = _filled(256, np.float32, rank)
    if rank == 1:
        return (lambda: dist.scatter(a, None, src=0, group=g)), [a]
    outs = [_filled(256, np.float32, 50) for _ in range(n)] if rank == 0 else None
    return (lambda: dist.gather(a, outs, dst=0, group=g)), [a, *(outs or [])]


def _p2p_dtype(rank: int, g: Any):
    if rank == 0:
        a = _filled(1024, np.float32, rank)
        return (lambda: dist.send(a, dst=1, group=g)), []
    if rank == 1:
        b = _filled(1024, np.int32, rank)
        return (lambda: dist.recv(b, src=0, group=g)), [b]
    return (lambda: None), []


def _p2p_shape(rank: int, g: Any):
    if rank == 0:
        a = _filled(1024, np.float32, rank)
        return (lambda: dist.send(a, dst=1, group=g)), []
    if rank == 1:
        b = _filled(512, np.float32, rank).reshape(2, 256)
        return (lambda: dist.recv(b, src=0, group=g)), [b]
    return (lambda: None), []


_EXTRA_GROUPS: list[Any] = []  # groups a case made besides its own: destroyed after it


def _group_sub_vs_sub(rank: int, g: Any):
    # Rank 1 calls on a second group with the same members: neither call can finish.
    other = dist.new_group(list(range(dist.get_world_size())), timeout=15)
    _EXTRA_GROUPS.append(other)
    a = _filled(1024, np.float32, rank)
    if rank == 1:
        return (lambda: dist.broadcast(a, src=0, group=other)), [a]
    return (lambda: dist.all_reduce(a, group=g)), [a]


def _group_pair_vs_all(rank: int, g: Any):
    # Rank 0 calls on the group of ranks 0 and 1, the others on the group of all ranks.
    pair = dist.new_group([0, 1], timeout=15)  # every rank calls new_group
    if rank in (0, 1):
        _EXTRA_GROUPS.append(pair)
    a = _filled(1024, np.float32, rank)
    if rank == 0:
        return (lambda: dist.all_reduce(a, group=pair)), [a]
    return (lambda: dist.broadcast(a, src=0, group=g)), [a]


def _group_async_wait(rank: int, g: Any):
    # Rank 1 issues on a second group asynchronously and waits for it at once.
    other = dist.new_group(list(range(dist.get_world_size())), timeout=15)
    _EXTRA_GROUPS.append(other)
    a = _filled(1024, np.float32, rank)
    if rank == 1:
        return (lambda: dist.all_reduce(a, group=other, async_op=True).wait()), [a]
    return (lambda: dist.all_reduce(a, group=g)), [a]


def _group_sub_vs_sub_all_to_all(rank: int, g: Any):
    # As group-sub-vs-sub, with all_to_all (block sizes first, then blocks) on rank 1.
    other = dist.new_group(list(range(dist.get_world_size())), timeout=15)
    _EXTRA_GROUPS.append(other)
    if rank == 1:
        n = dist.get_world_size()
        outs = [np.zeros(3, np.float32) for _ in range(n)]
        ins = [np.ones(3, np.float32) for _ in range(n)]
        return (lambda: dist.all_to_all(outs, ins, group=other)), outs
    a = _filled(1024, np.float32, rank)
    return (lambda: dist.all_reduce(a, group=g)), [a]


def _group_world_vs_sub(rank: int, g: Any):
    # Rank 1 calls on the default group, the others on a subgroup of the same ranks.
    # (It leaves the default group failed: keep this case last.)
    a = _filled(1024, np.float32, rank)
    return (lambda: dist.all_reduce(a, group=None if rank == 1 else g)), [a]


# (id, case, ranks expected to raise: "all" or the ranks involved)
MISMATCH_CASES: list[tuple[str, Case, str]] = [
    ("kind", _kind, "all"),
    ("size", _size, "all"),
    ("size-paths", _size_large, "all"),
    ("dtype", _dtype, "all"),
    ("reduce-op", _reduce_op, "all"),
    ("root-broadcast", _root_broadcast, "all"),
    ("root-scatter", _root_scatter, "all"),
    ("root-reduce", _root_reduce, "all"),
    ("root-gather", _root_gather, "all"),
    ("broadcast-vs-reduce", _broadcast_vs_reduce, "all"),
    ("gather-vs-scatter", _gather_vs_scatter, "all"),
    ("p2p-dtype", _p2p_dtype, "pair"),
    ("p2p-shape", _p2p_shape, "pair"),
    ("group-sub-vs-sub", _group_sub_vs_sub, "all"),
    ("group-pair-vs-all", _group_pair_vs_all, "all"),
    ("group-async-wait", _group_async_wait, "all"),
    ("group-sub-vs-sub-all-to-all", _group_sub_vs_sub_all_to_all, "all"),
    ("group-world-vs-sub", _group_world_vs_sub, "all"),  # last: fails the default group
]


def run_mismatches(rank: int, n: int, names: list[str]) -> dict[str, tuple[Any, ...]]:
    """Rank body: every case in ``names`` on a fresh group; per case
    ``(error class name, message, seconds, outputs untouched)``."""
    cases = {c[0]: c[1] for c in MISMATCH_CASES}
    out = {}
    for name in names:
        group = dist.new_group(list(range(n)), timeout=15)
        call, outputs = cases[name](rank, group)
        before = [o.copy() for o in outputs]
        start = time.monotonic()
        try:
            call()
            result: tuple[Any, ...] = ("no error", "")
        except dist.DistError as exc:
            result = (type(exc).__name__, str(exc))
        elapsed = time.monotonic() - start
        untouched = all(np.array_equal(b, o) for b, o in zip(before, outputs, strict=True))
        out[name] = (*result, elapsed, untouched)
        dist.destroy_process_group(group)
        while _EXTRA_GROUPS:
            dist.destroy_process_group(_EXTRA_GROUPS.pop())
    return out


def run_kill(rank: int, n: int, seed: int) -> tuple[Any, ...]:
    """Rank body: all-reduces of random sizes (64 KiB - 4 MiB) until a randomly chosen
    rank SIGKILLs itself at a random moment; survivors report
    ``(class, message, peer, caused_by, seconds since the kill, victim)``."""
    from distrib.comm import _api

    store = _api._world.store  # the job's store, hosted by the harness (test-only access)
    rng = random.Random(seed)
    victim = rng.randrange(n)
    rounds = rng.randrange(1, 6)
    delay = rng.uniform(0.0, 0.02)
    sizes = [rng.choice([1 << 14, 1 << 16, 1 << 18, 1 << 20]) for _ in range(rounds + 50)]
    for i, size in enumerate(sizes):
        buf = np.ones(size, np.float32)
        if rank == victim and i == rounds:
            dist.all_reduce(buf, async_op=True)
            time.sleep(delay)
            store.set("killed_at", repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            dist.all_reduce(buf)
        except dist.DistError as exc:
            now = time.time()
            killed = float(store.get("killed_at"))
            return type(exc).__name__, str(exc), exc.peer, exc.caused_by, now - killed, victim
    return "no error", "", None, None, 0.0, victim


def run_groups_out_of_order(rank: int, n: int, pause_s: float) -> list[float]:
    """Rank body: two groups used in a different order on different ranks, in a way that
    finishes (rank 0's first call is asynchronous): no rank may see a mismatch, even
    though rank 1 waits ``pause_s`` in the second group's call first."""
    sub = dist.new_group(list(range(n)), timeout=15)
    a = np.full(1024, 1.0 + rank, np.float32)
    b = np.full(1024, 10.0 + rank, np.float32)
    if rank == 0:
        work = dist.all_reduce(a, async_op=True)  # the default group, on its own thread
        time.sleep(pause_s)
        dist.all_reduce(b, group=sub)
        work.wait()
    else:
        dist.all_reduce(b, group=sub)
        dist.all_reduce(a)
    dist.destroy_process_group(sub)
    return [float(a[0]), float(b[0])]
