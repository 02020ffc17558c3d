"""Measure the synchronisation options for the shared-memory engine.

Run ``python benchmarks/bench_shm_sync.py`` (wrap it in
``flock /tmp/distrib-bench.lock``). Prints two tables:

1. ping-pong round trip between 2 processes: pure spinning on a shared word,
   futex wait with no spinning, spin-then-futex (the engine's choice), a
   ``sched_yield`` loop, and a ZeroMQ PAIR notification over ipc://;
2. barrier rounds per second with more processes than cores (oversubscribed),
   where pure spinning starves the ranks it waits for.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from typing import Any

from distrib.transport.shm._segment import SegmentLayout, SharedSegment
from distrib.transport.shm._sync import PhaseSync

_FOREVER = 10**12  # spin count meaning "never sleep"


def _sync_for(seg: SharedSegment, rank: int, n: int, spin: Any) -> PhaseSync:
    spin, yield_s = spin if isinstance(spin, tuple) else (spin, 0.0)
    return PhaseSync(
        seg.header,
        seg.addr,
        rank,
        n,
        list(range(n)),
        [os.getpid()] * n,
        spin=spin,
        yield_s=yield_s,
    )


def _pingpong_shm(seg: SharedSegment, rank: int, spin: int, rounds: int, out: Any) -> None:
    sync = _sync_for(seg, rank, 2, spin)
    deadline = time.monotonic() + 120
    other = 1 - rank
    t0 = time.perf_counter()
    for i in range(rounds):
        if rank == 0:
            sync.signal(2 * i + 1)
            sync.wait(other, 2 * i + 2, "bench", deadline)
        else:
            sync.wait(other, 2 * i + 1, "bench", deadline)
            sync.signal(2 * i + 2)
    if rank == 0:
        out.put((time.perf_counter() - t0) / rounds)
    sync.close()


def _pingpong_yield(seg: SharedSegment, rank: int, rounds: int, out: Any) -> None:
    words = seg.header.cast("I")
    mine, other = 32 * (1 + rank), 32 * (2 - rank)
    t0 = time.perf_counter()
    for i in range(rounds):
        if rank == 0:
            words[mine] = 2 * i + 1
            while words[other] < 2 * i + 2:
                os.sched_yield()
        else:
            while words[other] < 2 * i + 1:
                os.sched_yield()
            words[mine] = 2 * i + 2
    if rank == 0:
        out.put((time.perf_counter() - t0) / rounds)
    words.release()


def _pingpong_zmq(addr: str, rank: int, rounds: int, out: Any) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    if rank == 0:
        sock.bind(addr)
    else:
        sock.connect(addr)
    if rank == 0:
        sock.recv()  # peer is connected
        t0 = time.perf_counter()
        for _ in range(rounds):
            sock.send(b"x")
            sock.recv()
        out.put((time.perf_counter() - t0) / rounds)
    else:
        sock.send(b"ready")
        for _ in range(rounds):
            sock.recv()
            sock.send(b"y")
    sock.close()
    ctx.term()


def _barriers(seg: SharedSegment, rank: int, n: int, spin: int, rounds: int, out: Any) -> None:
    sync = _sync_for(seg, rank, n, spin)
    deadline = time.monotonic() + 60
    t0 = time.perf_counter()
    for i in range(rounds):
        sync.signal(i + 1)
        sync.wait_all(i + 1, "bench", deadline)
    out.put((rank, rounds, time.perf_counter() - t0))
    sync.close()


def _run(target: Any, args_per_rank: list[tuple[Any, ...]], replies: int = 1) -> list[Any]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, out)) for a in args_per_rank]
    for p in procs:
        p.start()
    results = []
    for _ in range(replies):
        try:
            results.append(out.get(timeout=60))
        except Exception:
            break
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    return results


def main(argv: list[str] | None = None) -> None:
    """Print the synchronisation tables."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--oversubscribe", type=int, default=7, help="ranks for the barrier table")
    args = ap.parse_args(argv)
    seg = SharedSegment.create(SegmentLayout(max(2, args.oversubscribe), 4096))
    try:
        print(f"ping-pong round trip, 2 processes, {os.cpu_count()} cores")
        print(f"{'method':<44}{'round trip (us)':>16}")
        for label, spin in (
            ("spin only (shared word)", _FOREVER),
            ("futex wait, no spin", 0),
            ("spin 400 then futex", 400),
            ("spin 400, yield 2 ms, futex (engine)", (400, 0.002)),
            ("yield 2 ms, futex (engine, oversubscribed)", (0, 0.002)),
        ):
            for q in range(len(seg.header) // 4):
                seg.header.cast("I")[q] = 0
            rounds = args.rounds if spin else args.rounds // 4
            res = _run(_pingpong_shm, [(seg, r, spin, rounds) for r in range(2)])
            print(f"{label:<44}{res[0] * 1e6:>16.1f}")
        for q in range(len(seg.header) // 4):
            seg.header.cast("I")[q] = 0
        res = _run(_pingpong_yield, [(seg, r, args.rounds) for r in range(2)])
        print(f"{'sched_yield loop':<44}{res[0] * 1e6:>16.1f}")
        with tempfile.TemporaryDirectory() as tmp:
            addr = f"ipc://{tmp}/pingpong"
            res = _run(_pingpong_zmq, [(addr, r, args.rounds // 4) for r in range(2)])
            print(f"{'ZeroMQ PAIR ipc:// message':<44}{res[0] * 1e6:>16.1f}")
        n = args.oversubscribe
        print(f"\nbarrier among {n} processes on {os.cpu_count()} cores")
        print(f"{'method':<44}{'barriers/s':>16}")
        for label, spin in (
            ("spin only", _FOREVER),
            ("futex wait, no spin", 0),
            ("spin 400 then futex", 400),
            ("spin 400, yield 2 ms, futex", (400, 0.002)),
            ("yield 2 ms, futex (engine)", (0, 0.002)),
        ):
            for q in range(len(seg.header) // 4):
                seg.header.cast("I")[q] = 0
            rounds = 300 if spin == _FOREVER else 3000
            res = _run(_barriers, [(seg, r, n, spin, rounds) for r in range(n)], n)
            if len(res) < n:
                print(f"{label:<44}{'(did not finish)':>16}")
                continue
            rounds = min(r[1] for r in res)
            secs = max(r[2] for r in res)
            print(f"{label:<44}{rounds / secs:>16.0f}")
    finally:
        seg.close()


if __name__ == "__main__":
    main()
