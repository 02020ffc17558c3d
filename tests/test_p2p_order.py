"""Point-to-point operations never wait on work issued after them: a send's verdict
(the receiver's "your message matched my recv") and a receive posted before its send
both step aside for later work, and receives still match sends in post order.

An ``isend`` whose handle gets a done callback (the torch backend adds one to every
send) asks for the verdict as soon as the data left. That question used to block the
rank's queue, so two ranks that each sent, then issued the matching receive, waited for
each other's receive until the timeout. These tests make the send finish before the
receive is issued, on purpose, on both ranks.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from _ranks import rank_values

import distrib as dist
from distrib.testing import run_local_ranks

TRANSPORTS = ["zmq", "auto"]


def _values(fn, world: int, *args, transport: str, timeout: float = 60) -> list:
    """``fn(rank, world, *args)`` on ``world`` ranks over ``transport`` (20 s group
    timeout); their return values, failing on any rank that did not return."""
    return rank_values(
        run_local_ranks(
            fn,
            world,
            *args,
            timeout=timeout,
            group_timeout=20,
            env={"DISTRIB_TRANSPORT": transport},
        )
    )


def _crossed(rank: int, world: int, sends: int) -> list[list[float]]:
    """Each rank sends ``sends`` messages to the other, lets them leave, then receives."""
    peer = 1 - rank
    works = [
        dist.isend(np.full(3, 10 * rank + i, np.float32), dst=peer, tag=i) for i in range(sends)
    ]
    time.sleep(0.2)  # every send has left: the verdicts are asked for at once
    for w in works:
        w.add_done_callback(lambda _w: None)
    outs = [np.zeros(3, np.float32) for _ in range(sends)]
    recvs = [dist.irecv(out, src=peer, tag=i) for i, out in enumerate(outs)]
    for w in recvs + works:
        w.wait()
    return [out.tolist() for out in outs]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sends", [1, 8])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_crossed_sends_complete(transport: str, sends: int) -> None:
    start = time.monotonic()
    values = _values(_crossed, 2, sends, transport=transport)
    for rank, value in enumerate(values):
        peer = 1 - rank
        assert value == [[10.0 * peer + i] * 3 for i in range(sends)]
    # Far below the 20 s group timeout: nobody waited for a receive stuck behind a verdict.
    assert time.monotonic() - start < 15


def _crossed_mismatch(rank: int, world: int) -> str:
    """Rank 0 sends float32, rank 1 receives int32: the sender learns it from its Work."""
    if rank == 0:
        w = dist.isend(np.ones(4, np.float32), dst=1)
        time.sleep(0.2)
        w.add_done_callback(lambda _w: None)
        try:
            w.wait()
        except dist.DistMismatchError as exc:
            return str(exc)
        return "no error"
    try:
        dist.recv(np.zeros(4, np.int32), src=0)
    except dist.DistMismatchError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_verdict_still_reports_a_mismatch(transport: str) -> None:
    for value in _values(_crossed_mismatch, 2, transport=transport):
        assert "float32" in value and "int32" in value, value


def _receives_first(rank: int, world: int) -> list[list[float]]:
    """A ring where every receive is posted before the sends it waits for."""
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    got = [np.zeros(3, np.float32) for _ in range(6)]
    mine = [np.full(3, 10 * rank + i, np.float32) for i in range(6)]
    # irecv, a collective, then the send: the receive does not block the all-reduce
    r0 = dist.irecv(got[0], src=prv)
    total = np.ones(1, np.float32)
    dist.all_reduce(total)
    s0 = dist.isend(mine[0], dst=nxt)
    # three receives with one tag, the last a blocking recv on a thread, then the sends:
    # they take the messages in the order they were posted
    r1 = dist.irecv(got[1], src=prv, tag=5)
    r2 = dist.irecv(got[2], src=prv, tag=5)
    time.sleep(0.05)  # r1 and r2 wait for their messages already
    th = threading.Thread(target=dist.recv, args=(got[3], prv), kwargs={"tag": 5})
    th.start()
    time.sleep(0.05)
    sends = [dist.isend(mine[i], dst=nxt, tag=5) for i in (1, 2, 3)]
    # a blocking send on a thread while this thread receives (and the reverse)
    tx = threading.Thread(target=dist.send, args=(mine[4], nxt))
    tx.start()
    dist.recv(got[4], src=prv)
    tx.join(30)
    # a batch listed receive first
    for w in dist.batch_isend_irecv(
        [dist.P2POp(dist.irecv, got[5], prv), dist.P2POp(dist.isend, mine[5], nxt)]
    ):
        w.wait()
    th.join(30)
    for w in [r0, s0, r1, r2, *sends]:
        w.wait()
    assert not th.is_alive() and not tx.is_alive()
    assert total[0] == world
    return [out.tolist() for out in got]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_receives_posted_before_their_sends_complete(transport: str, world: int) -> None:
    start = time.monotonic()
    for rank, value in enumerate(_values(_receives_first, world, transport=transport)):
        prv = (rank - 1) % world
        assert value == [[10.0 * prv + i] * 3 for i in range(6)], (rank, value)
    assert time.monotonic() - start < 15  # no receive waited out the group timeout


def _late_send(rank: int, world: int) -> str:
    """Rank 1 never sends: rank 0's posted receive times out, naming rank 1."""
    if rank == 1:
        time.sleep(4)
        return "idle"
    w = dist.irecv(np.zeros(2, np.float32), src=1)
    try:
        w.wait()
    except dist.DistTimeoutError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(90)
def test_a_receive_whose_send_never_comes_times_out() -> None:
    results = run_local_ranks(_late_send, 2, timeout=60, group_timeout=2)
    assert results[0].ok, results[0].describe()
    assert "rank 1" in results[0].value and "timed out" in results[0].value, results[0].value


def _send_behind_a_waiting_receive(rank: int, world: int) -> list[float]:
    """Rank 0's blocking sends are confirmed while its earlier receive still waits: rank
    1 sends the message that receive waits for only after taking both of rank 0's."""
    x, z, y = (np.zeros(4, np.float32) for _ in range(3))
    if rank == 0:
        w = dist.irecv(y, src=1)
        dist.send(np.full(4, 1.0, np.float32), 1)
        dist.send(np.full(4, 2.0, np.float32), 1, tag=1)
        w.wait()
        return y.tolist()
    dist.recv(x, 0)
    dist.recv(z, 0, tag=1)
    dist.send(x + z, 0)
    return (x + z).tolist()


def _many_tags(rank: int, world: int, n: int) -> list[float]:
    """Rank 0 posts ``n`` receives with distinct tags; rank 1 sends them one at a time,
    each send waiting for its receiver's answer."""
    if rank == 0:
        outs = [np.zeros(2, np.float32) for _ in range(n)]
        works = [dist.irecv(out, src=1, tag=i) for i, out in enumerate(outs)]
        for w in works:
            w.wait()
        return [float(out[0]) for out in outs]
    for i in range(n):
        dist.send(np.full(2, i, np.float32), 0, tag=i)
    return []


def _idle_while_waiting(rank: int, world: int, n: int) -> float:
    """Rank 0's CPU time while ``n`` posted receives wait 2 s for rank 1's sends."""
    if rank == 1:
        time.sleep(2.0)
        for i in range(n):
            dist.send(np.zeros(1, np.float32), 0, tag=i)
        return 0.0
    start_cpu, start = time.process_time(), time.monotonic()
    works = [dist.irecv(np.zeros(1, np.float32), src=1, tag=i) for i in range(n)]
    works[0].wait()
    cpu, wall = time.process_time() - start_cpu, time.monotonic() - start
    for w in works:
        w.wait()
    return cpu / wall


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_waiting_receives_do_not_block_sends_or_each_other_or_spin(transport: str) -> None:
    start = time.monotonic()
    assert _values(_send_behind_a_waiting_receive, 2, transport=transport)[0] == [3.0] * 4
    assert _values(_many_tags, 2, 20, transport=transport)[0] == [float(i) for i in range(20)]
    assert time.monotonic() - start < 15  # nothing waited out the group timeout
    busy = _values(_idle_while_waiting, 2, 200, transport=transport)[0]
    # Waiting is asleep in poll(): a few percent of a core, not a busy loop.
    assert busy < 0.25, f"rank 0 used {busy:.0%} of a core waiting"


def _threads_exchanging(rank: int, world: int, rounds: int, threads: int) -> list[str]:
    """Several threads of each rank post a receive, then send, on one group, at once."""
    peer = 1 - rank
    outcome = ["not finished"] * threads

    def exchange(tag: int) -> None:
        got = np.zeros(3, np.float32)
        for i in range(rounds):
            w = dist.irecv(got, peer, tag=tag)
            dist.send(np.full(3, i, np.float32), peer, tag=tag)
            w.wait()
            if got[0] != i:
                outcome[tag] = f"round {i}: got {got[0]}"
                return
        outcome[tag] = "ok"

    workers = [threading.Thread(target=exchange, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(40)
    return outcome


def _late_sender(rank: int, world: int) -> str:
    """Both ranks keep all-reducing on the group where rank 0 posted a receive; rank 1
    sends its message only after 400 of them (over 4 s), past the group timeout (3 s)."""
    got = np.zeros(2, np.float32)
    w = dist.irecv(got, src=1) if rank == 0 else None
    for _ in range(400):  # a count, not a time: both ranks make the same calls
        dist.all_reduce(np.ones(2, np.float32))
        time.sleep(0.01)
    if rank == 1:
        dist.send(np.full(2, 7.0, np.float32), 0)
        return "sent"
    assert w is not None
    w.wait()
    return f"got {got.tolist()}"


def _dies_while_peer_works(rank: int, world: int) -> str:
    """Rank 0 has a receive from rank 1 posted and keeps sending to rank 2 on the same
    group; rank 1 dies."""
    if rank == 1:
        time.sleep(0.5)
        os._exit(3)
    buf = np.zeros(2, np.float32)
    start = time.monotonic()
    try:
        if rank == 2:
            for _ in range(2000):
                dist.recv(buf, 0)
            return "done"
        w = dist.irecv(buf, src=1)
        for _ in range(2000):
            dist.send(np.ones(2, np.float32), 2)
            time.sleep(0.01)
        w.wait()
    except dist.DistError as exc:
        return f"{type(exc).__name__} after {time.monotonic() - start:.1f}s"
    return "no error"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_threads_posting_receives_and_sending_at_once(transport: str) -> None:
    values = _values(_threads_exchanging, 2, 100, 3, transport=transport, timeout=90)
    assert values == [["ok"] * 3] * 2, values


@pytest.mark.timeout(120)
def test_a_posted_receive_on_a_busy_rank() -> None:
    # The timeout (3 s) bounds how long a receive holds its group up, not how long it
    # stays posted while the group works: the message that comes at 5 s is received.
    results = run_local_ranks(_late_sender, 2, timeout=60, group_timeout=3)
    assert all(r.ok for r in results), "\n".join(r.describe() for r in results)
    assert results[0].value == "got [7.0, 7.0]", results[0].value
    # A peer that dies while the group works is reported at once, not at the timeout.
    results = run_local_ranks(_dies_while_peer_works, 3, timeout=60, group_timeout=20)
    assert results[0].ok, results[0].describe()
    outcome, _, took = results[0].value.partition(" after ")
    assert outcome == "DistPeerLostError" and float(took[:-1]) < 8.0, results[0].value


def _many_unwaited_sends(rank: int, world: int, n: int) -> str:
    """``n`` isends, none waited until the receiver took them all (more answers than the
    ZeroMQ links keep one by one), then every Work waited."""
    if rank == 0:
        works = [dist.isend(np.full(1, i, np.float32), 1) for i in range(n)]
        dist.barrier()
        for w in works:
            w.wait()
        return "sent"
    got = np.zeros(1, np.float32)
    wrong = 0
    for i in range(n):
        dist.recv(got, 0)
        wrong += int(got[0] != i)
    dist.barrier()
    return f"{wrong} out of order"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sends_waited_long_after_their_answers_came(transport: str) -> None:
    values = _values(_many_unwaited_sends, 2, 5000, transport=transport, timeout=90)
    assert values == ["sent", "0 out of order"]
