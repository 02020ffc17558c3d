"""Without a launcher rank 0 hosts the store: its death reaches the others at once.

Rank 1 is blocked in a store request when rank 0 is SIGKILLed; its own
connection breaks, so it raises ``DistPeerLostError`` naming rank 0 as the
store's host within 2 s, instead of waiting out its 60 s timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
from _util import free_port

pytestmark = pytest.mark.timeout(60)


def _rank(rank: int, port: int, what: str, out) -> None:
    from distrib.store._rendezvous import rendezvous

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "WORLD_SIZE": "2"}  # fmt: skip
    os.environ.pop("DISTRIB_AUTH_TOKEN", None)
    os.environ.pop("DISTRIB_STORE_ADDR", None)
    rdzv = rendezvous("env://", None, None, 60.0, env=env)
    store = rdzv.store
    if rank == 0:
        store.set("up", b"1")
        out.put(("up", os.getpid()))
        time.sleep(60)
        return
    store.get("up")
    if what == "idle":
        out.put(("blocked", time.time()))
        time.sleep(1.5)  # rank 0 dies while this rank is between requests
    try:
        if what == "blocked":
            out.put(("blocked", time.time()))
        store.get("never")  # would wait 60 s
        out.put(("no error", time.time(), ""))
    except Exception as exc:
        out.put((type(exc).__name__, time.time(), str(exc)))
    try:
        store.set("again", b"x")
        out.put(("no error", time.time(), ""))
    except Exception as exc:
        out.put((type(exc).__name__, time.time(), str(exc)))


@pytest.mark.parametrize("what", ["blocked", "idle"])
def test_rank0_death_is_seen_on_the_survivors_connection(what):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, what, out), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        msgs = {}
        while len(msgs) < 2:
            m = out.get(timeout=40)
            msgs[m[0]] = m
        time.sleep(0.5)  # rank 1 is inside its get (or idle, for "idle")
        os.kill(msgs["up"][1], signal.SIGKILL)
        killed = time.time()
        name, when, text = out.get(timeout=30)
        assert name == "DistPeerLostError", (name, text)
        assert "hosted by rank 0" in text and "rank 0 has probably exited" in text, text
        assert when - killed < 2.0, f"survivor noticed after {when - killed:.1f} s"
        name2, when2, text2 = out.get(timeout=30)  # the next request: refused at once
        assert name2 == "DistPeerLostError" and "rank 0" in text2, (name2, text2)
        assert when2 - killed < 3.0
    finally:
        for p in procs:
            p.kill()
            p.join(10)


def test_a_group_polling_its_failure_key_reports_the_lost_store_host():
    import types

    import distrib
    from distrib.comm._flight import MASK, FlightRecorder, State
    from distrib.comm._group import ProcessGroup

    class LostStore:
        def check(self, keys):
            raise distrib.DistPeerLostError(
                "store.check: lost the connection to the store at 127.0.0.1:1 (hosted by rank 0)",
                op="store.check",
                peer=0,
            )

    flight = FlightRecorder([0, 1], 1)
    entry = flight.ring[7 & MASK]
    entry.seq, entry.op, entry.state = 7, "all_reduce", State.STARTED
    flight.running = 7
    group = types.SimpleNamespace(
        _fail_store=LostStore(), _fail_store_ok_after=0.0, global_rank=1, _watch=None, flight=flight
    )
    with pytest.raises(distrib.DistPeerLostError, match="hosted by rank 0") as info:
        ProcessGroup._check_failed(group)  # type: ignore[arg-type]
    # named after the collective the rank was in, not the store's request
    assert str(info.value).startswith("all_reduce: rank 1 stopped: lost the connection"), info.value
    assert info.value.rank == 1 and info.value.peer == 0 and info.value.op == "all_reduce"
