"""Fault tables for the collectives: every mismatch kind and a rank killed at a random
moment, on both transports, at world 2-4.

Mismatch rows: every rank involved raises ``DistMismatchError`` promptly, naming both
sides' calls, and the arrays the call could write are untouched (no wrong data). The
``group-*`` rows put rank 1 in a collective of another group with the same members
(a second subgroup, or the default group): the calls never meet, and every rank still
raises within seconds instead of waiting out the group timeout.
Kill rows: every survivor raises within 2 s of the SIGKILL, naming the dead rank as
``peer`` (and ``caused_by`` when its error is a consequence), never a neighbour.
"""

from __future__ import annotations

import pytest
from _trust_cases import MISMATCH_CASES, run_groups_out_of_order, run_kill, run_mismatches

from distrib.comm._blocked import Blocked, find_cycle, group_mismatch_error
from distrib.testing import run_local_ranks

PROMPT_S = 2.0  # a mismatch is found in the call's first step: far below the group timeout
# Calls on different groups never meet: found once a wait lasted BLOCKED_AFTER_S (0.5 s),
# far below the group timeout (15 s); the bound leaves room for a loaded machine.
GROUP_PROMPT_S = 5.0
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
            if elapsed > (GROUP_PROMPT_S if name.startswith("group-") else PROMPT_S):
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
    from distrib.transport._calldesc import CallDesc, mismatch_error

    a = CallDesc("broadcast", (1024,), "<f4", root=0, group=(0, 1))
    b = a._replace(root=1)
    err = mismatch_error([a, b], 0, [0, 1], 7, "broadcast")
    text = str(err)
    assert "rank 0 called broadcast(root=0, 1024 x float32" in text
    assert "but rank 1 called broadcast(root=1, 1024 x float32" in text
    assert "root differs" in text and err.peer == 1 and err.rank == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_groups_used_in_an_order_that_can_finish_are_not_a_mismatch(transport):
    # Rank 1 waits 2 s in the subgroup's all_reduce while rank 0's default-group
    # all_reduce (asynchronous) waits for rank 1: slow, but no deadlock.
    results = run_local_ranks(
        run_groups_out_of_order, 2, 2.0, timeout=50, group_timeout=15,
        env={"DISTRIB_TRANSPORT": transport},
    )  # fmt: skip
    assert [r.value for r in results] == [[3.0, 21.0]] * 2, [r.describe() for r in results]


def _blocked(rank, key, ranks, seq, entered, op="all_reduce"):
    return Blocked(rank, key, ranks, seq, op, None, entered)


def test_wait_cycle_between_groups_is_found_and_named():
    # rank 0 in op #3 of the default group; rank 1 in op #0 of a subgroup of both
    r0 = _blocked(0, "[0, 1]#0", (0, 1), 3, {"[0, 1]#0": 3, "[0, 1]#1": -1})
    r1 = _blocked(1, "[0, 1]#1", (0, 1), 0, {"[0, 1]#0": 2, "[0, 1]#1": 0}, op="broadcast")
    cycle = find_cycle(r0, {0: r0, 1: r1})
    assert cycle == [r0, r1]
    err = group_mismatch_error(cycle)
    assert "rank 0 called all_reduce on group [0, 1]#0" in str(err)
    assert "but rank 1 is in broadcast on group [0, 1]#1" in str(err)
    assert (err.rank, err.peer, err.op) == (0, 1, "all_reduce")
    # rank 1 already entered op #3 of the default group (asynchronously): it can finish
    r1_ahead = r1._replace(entered={"[0, 1]#0": 3, "[0, 1]#1": 0})
    assert find_cycle(r0, {0: r0, 1: r1_ahead}) is None
    # a rank that published nothing (computing, or in an asynchronous op) is no cycle
    assert find_cycle(r0, {0: r0}) is None
    # three groups in a ring: 0 waits for 1, 1 for 2, 2 for 0
    a = _blocked(0, "[0, 1]#0", (0, 1), 0, {"[0, 1]#0": 0, "[0, 2]#0": -1})
    b = _blocked(1, "[1, 2]#0", (1, 2), 0, {"[0, 1]#0": -1, "[1, 2]#0": 0})
    c = _blocked(2, "[0, 2]#0", (0, 2), 0, {"[1, 2]#0": -1, "[0, 2]#0": 0})
    assert find_cycle(a, {0: a, 1: b, 2: c}) == [a, b, c]
    assert Blocked.decode(a.encode()) == a and Blocked.decode(b"\x93garbage") is None


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
