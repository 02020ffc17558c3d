"""Fault tables for the collectives: every mismatch kind and a rank killed at a random
moment, on both transports, at world 2-4.

Mismatch rows: every rank involved raises ``DistMismatchError`` promptly, naming both
sides' calls, and the arrays the call could write are untouched (no wrong data).
Kill rows: every survivor raises within 2 s of the SIGKILL, naming the dead rank as
``peer`` (and ``caused_by`` when its error is a consequence), never a neighbour.
"""

from __future__ import annotations

import pytest
from _trust_cases import MISMATCH_CASES, run_kill, run_mismatches

from distrib.comm._local_ranks import run_local_ranks

PROMPT_S = 2.0  # a mismatch is found in the call's first step: far below the group timeout
DEAD_PEER_S = 2.0  # the promise: every survivor reports a dead peer within 2 s
NAMES = [c[0] for c in MISMATCH_CASES]
INVOLVED = {c[0]: c[2] for c in MISMATCH_CASES}


def check_mismatch_results(results, n, names):
    """Problems found in one mismatch run (empty when every promise held)."""
    problems = [r.describe() for r in results if not r.ok]
    for res in results:
        if not res.ok:
            continue
        for name in names:
            cls, message, elapsed, untouched = res.value[name]
            expect = INVOLVED[name] == "all" or res.rank in (0, 1)
            where = f"{name}: rank {res.rank}/{n}"
            if not untouched:
                problems.append(f"{where}: an output buffer was written ({cls})")
            if not expect:
                continue
            if cls != "DistMismatchError":
                problems.append(f"{where}: {cls} {message}")
            elif "rank 1" not in message or "called" not in message:
                problems.append(f"{where}: message does not name both calls: {message}")
            if elapsed > PROMPT_S:
                problems.append(f"{where}: took {elapsed:.1f} s")
    return problems


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_every_mismatch_raises_on_every_rank_before_writing(transport, world):
    results = run_local_ranks(
        run_mismatches,
        world,
        NAMES,
        timeout=100,
        group_timeout=15,
        env={"DISTRIB_TRANSPORT": transport},
    )
    problems = check_mismatch_results(results, world, NAMES)
    assert not problems, "\n".join(problems)


def test_mismatch_message_names_both_calls_in_plain_words():
    from distrib.comm._calldesc import CallDesc, mismatch_error

    a = CallDesc("broadcast", (1024,), "<f4", root=0, group=(0, 1))
    b = a._replace(root=1)
    err = mismatch_error([a, b], 0, [0, 1], 7, "broadcast")
    text = str(err)
    assert "rank 0 called broadcast(root=0, 1024 x float32" in text
    assert "but rank 1 called broadcast(root=1, 1024 x float32" in text
    assert "root differs" in text and err.peer == 1 and err.rank == 0


def check_kill_results(results, world):
    """Problems found in one kill run, plus the survivors' latencies."""
    victims = {r.value[5] for r in results if r.ok and r.value}
    problems, latencies = [], []
    if len(victims) != 1:
        return [f"no single victim: {[r.describe() for r in results]}"], latencies
    victim = victims.pop()
    for res in results:
        if res.rank == victim:
            if res.exitcode != -9:
                problems.append(f"victim rank {victim}: {res.describe()}")
            continue
        if not res.ok:
            problems.append(res.describe())
            continue
        cls, message, peer, caused_by, latency, _ = res.value
        latencies.append(latency)
        where = f"rank {res.rank}/{world} (rank {victim} killed)"
        if cls == "no error":
            problems.append(f"{where}: completed without an error")
        elif peer != victim or f"rank {victim}" not in message:
            problems.append(f"{where}: blamed peer={peer} caused_by={caused_by}: {message}")
        if latency > DEAD_PEER_S:
            problems.append(f"{where}: {latency:.2f} s after the kill: {message}")
    return problems, latencies


KILL_ROWS = [(t, w, seed) for t in ("shm", "zmq") for w in (2, 3, 4) for seed in (w,)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "transport,world,seed", KILL_ROWS, ids=[f"{t}-world{w}-seed{s}" for t, w, s in KILL_ROWS]
)
def test_dead_rank_reported_by_every_survivor_within_2s(transport, world, seed):
    results = run_local_ranks(
        run_kill,
        world,
        seed,
        timeout=60,
        group_timeout=30,
        env={"DISTRIB_TRANSPORT": transport},
    )
    problems, _ = check_kill_results(results, world)
    assert not problems, "\n".join(problems)
