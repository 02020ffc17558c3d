"""Without a launcher rank 0 hosts the store, so it stops serving last.

A rank still finishing its last collective reads the store (failure checks);
if rank 0 closed it first, that rank would report rank 0 as dead. On a clean
``destroy_process_group`` rank 0 waits (bounded) until every rank has left;
after a failure, or for a rank that exited without tearing down, it does not
wait for ever.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest
from _util import free_port

pytestmark = pytest.mark.timeout(90)


def _rank(rank: int, port: int, how: str, timeout: float, out) -> None:
    for key in ("DISTRIB_AUTH_TOKEN", "DISTRIB_STORE_ADDR"):
        os.environ.pop(key, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")  # fmt: skip
    import distrib
    from distrib.comm import _api

    distrib.init_process_group(timeout=timeout)
    x = np.ones(1000, np.float32)
    if rank == 1 and how == "dies_mid_run":
        os._exit(0)  # never joins the collective
    try:
        distrib.all_reduce(x)
        error = ""
    except distrib.DistError as exc:
        error = type(exc).__name__
    if rank == 0:
        if how == "no_teardown":  # the interpreter's exit is rank 0's teardown
            out.put(("rank0", error, 0.0))
            return
        t0 = time.monotonic()
        distrib.destroy_process_group()
        out.put(("rank0", error, time.monotonic() - t0))
        return
    if how == "exits_without_teardown":
        os._exit(0)
    time.sleep(1.0)  # rank 0 is already tearing down
    store = _api._current().store
    try:
        store.check(["anything"])  # what a failure check does
        reached = "reached"
    except distrib.DistError as exc:
        reached = f"{type(exc).__name__}: {exc}"
    if how != "no_teardown":
        distrib.destroy_process_group()
    out.put(("rank1", reached, 0.0))


def _run(how: str, timeout: float) -> dict[str, tuple[str, float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, how, timeout, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        want = 2 if how in ("clean", "no_teardown") else 1
        got = {}
        while len(got) < want:
            who, what, seconds = out.get(timeout=60)
            got[who] = (what, seconds)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        return got
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)


def test_rank0_serves_the_store_until_the_others_have_left():
    got = _run("clean", 60.0)
    assert got["rank1"][0] == "reached"  # the store was still there after rank 0's destroy began
    error, waited = got["rank0"]
    assert error == "" and 0.8 < waited < 10.0, got


def test_without_destroy_process_group_rank0_still_leaves_last_at_exit():
    got = _run("no_teardown", 60.0)
    assert got["rank1"][0] == "reached", got


def test_a_rank_that_exits_without_teardown_holds_rank0_up_only_until_the_timeout():
    error, waited = _run("exits_without_teardown", 3.0)["rank0"]
    assert error == "" and waited < 6.0, (error, waited)


def test_after_a_failure_rank0_does_not_wait_for_anyone():
    error, waited = _run("dies_mid_run", 30.0)["rank0"]
    assert error == "DistPeerLostError" and waited < 2.0, (error, waited)


def _reinit_rank(rank: int, port: int, rounds: int, out) -> None:
    for key in ("DISTRIB_AUTH_TOKEN", "DISTRIB_STORE_ADDR"):
        os.environ.pop(key, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")  # fmt: skip
    import distrib

    sums = []
    try:
        for i in range(rounds):
            distrib.init_process_group(timeout=20.0)
            x = np.full(4, float(rank + i), np.float32)
            distrib.all_reduce(x)
            sums.append(float(x[0]))
            distrib.destroy_process_group()  # and straight into the next round
        out.put((rank, sums, ""))
    except distrib.DistError as exc:
        out.put((rank, sums, f"{type(exc).__name__}: {exc}"))


def test_ranks_can_join_a_new_group_at_the_same_address_right_after_destroy():
    # Each rank leaves and at once rendezvouses again on the same MASTER_PORT: a
    # rank that returned from destroy_process_group before rank 0's old store
    # closed would join that store and lose it mid-rendezvous.
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port, rounds = free_port(), 4
    procs = [ctx.Process(target=_reinit_rank, args=(r, port, rounds, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict((r, (sums, err)) for r, sums, err in (out.get(timeout=60) for _ in procs))
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    want = [float(2 * i + 1) for i in range(rounds)]  # (0 + i) + (1 + i)
    assert got == {0: (want, ""), 1: (want, "")}, got
