"""A send's verdict (the receiver's "your message matched my recv") never blocks work
issued after the send.

An ``isend`` whose handle gets a done callback (the torch backend adds one to every
send) asks for the verdict as soon as the data left. That question used to block the
rank's queue, so two ranks that each sent, then issued the matching receive, waited for
each other's receive until the timeout. These tests make the send finish before the
receive is issued, on purpose, on both ranks.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import distrib as dist
from distrib.testing import run_local_ranks

TRANSPORTS = ["zmq", "auto"]


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
    results = run_local_ranks(
        _crossed,
        2,
        sends,
        timeout=60,
        group_timeout=20,
        env={"DISTRIB_TRANSPORT": transport},
    )
    assert all(r.ok for r in results), "\n".join(r.describe() for r in results)
    for rank, r in enumerate(results):
        peer = 1 - rank
        assert r.value == [[10.0 * peer + i] * 3 for i in range(sends)]
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
    results = run_local_ranks(
        _crossed_mismatch, 2, timeout=60, group_timeout=20, env={"DISTRIB_TRANSPORT": transport}
    )
    assert all(r.ok for r in results), "\n".join(r.describe() for r in results)
    for r in results:
        assert "float32" in r.value and "int32" in r.value, r.value
