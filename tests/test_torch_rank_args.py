"""torch's ways to name a rank and the last torch.distributed names: ``group_src`` /
``group_dst`` beside ``src`` / ``dst``, torch's defaults, object point to point,
``barrier(timeout=)``, the launcher queries and ``init_process_group``'s parameter
order (real ranks over a real store)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import distrib as dist
from distrib.testing import run_local_ranks


def _values(results):
    bad = [r.describe() for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    return [r.value for r in results]


def _error(fn) -> str:
    try:
        fn()
    except (dist.DistUsageError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _group_ranks(rank, world):
    """World of 4; subgroup [1, 3] names its ranks by group rank."""
    out: dict = {}
    odd = dist.new_group([1, 3])
    # Defaults: gather and scatter go to / come from global rank 0 when nothing is named.
    mine = np.array([rank], np.int64)
    got = [np.zeros(1, np.int64) for _ in range(world)] if rank == 0 else None
    dist.gather(mine, got)
    out["gather_default"] = None if got is None else [int(g[0]) for g in got]
    part = np.zeros(1, np.int64)
    dist.scatter(part, [np.array([10 * i]) for i in range(world)] if rank == 0 else None)
    out["scatter_default"] = int(part[0])
    objs = [None] if rank else [{"from": 0}]
    dist.broadcast_object_list(objs)
    out["bcast_obj_default"] = objs[0]
    if rank in (1, 3):
        # Group rank 1 of [1, 3] is global rank 3.
        b = np.array([float(rank)])
        dist.broadcast(b, group=odd, group_src=1)
        out["broadcast"] = float(b[0])
        r = np.array([float(rank)])
        dist.reduce(r, group=odd, group_dst=0)
        out["reduce"] = float(r[0])
        g = [np.zeros(1), np.zeros(1)] if rank == 3 else None
        dist.gather(np.array([float(rank)]), g, group=odd, group_dst=1)
        out["gather"] = None if g is None else [float(x[0]) for x in g]
        s = np.zeros(1)
        dist.scatter(
            s, [np.array([5.0]), np.array([6.0])] if rank == 3 else None, group=odd, group_src=1
        )
        out["scatter"] = float(s[0])
        t = np.zeros(3)
        if rank == 1:
            dist.send(np.arange(3.0), group=odd, group_dst=1)
            dist.isend(np.arange(3.0) + 1, group=odd, group_dst=1).wait(30)
            out["recv_from"] = dist.recv(t, group=odd, group_src=1, tag=2)
        else:
            out["recv_from"] = dist.recv(t, group=odd, group_src=0)
            w = dist.irecv(t, group=odd, group_src=0)
            w.wait(30)
            out["irecv"] = t.tolist()
            dist.send(np.full(3, 9.0), dst=1, group=odd, tag=2)
        out["recv"] = t.tolist()
        gathered: list | None = [None, None] if rank == 1 else None
        dist.gather_object(f"r{rank}", gathered, group=odd, group_dst=0)
        out["gather_object"] = gathered
        got_obj = [None]
        dist.scatter_object_list(
            got_obj, [("a", 1), {"b"}] if rank == 3 else None, group=odd, group_src=1
        )
        out["scatter_object"] = got_obj[0]
        objs2 = [None, None] if rank == 1 else ["x", 7]
        dist.broadcast_object_list(objs2, group=odd, group_src=1)
        out["bcast_obj"] = objs2
        out["errors"] = [
            _error(lambda: dist.broadcast(b, src=3, group=odd, group_src=1)),
            _error(lambda: dist.broadcast(b, group=odd)),
            _error(lambda: dist.reduce(r, group=odd, group_dst=2)),
            _error(lambda: dist.send(b, group=odd, group_dst=True)),
            _error(lambda: dist.recv(b, group=odd)),
            _error(lambda: dist.irecv(b)),
            _error(lambda: dist.gather_object(1, None, dst=1, group=odd, group_dst=0)),
        ]
    else:
        # Non-members: no-ops with torch's return values.
        out["recv_nonmember"] = dist.recv(np.zeros(1), group=odd, group_src=0)
        out["irecv_nonmember"] = dist.irecv(np.zeros(1), group=odd, group_src=0)
    dist.barrier()
    return out


@pytest.mark.timeout(300)
def test_group_src_and_group_dst_name_ranks_within_the_group():
    values = _values(run_local_ranks(_group_ranks, 4, timeout=240))
    for rank, v in enumerate(values):
        assert v["gather_default"] == ([0, 1, 2, 3] if rank == 0 else None)
        assert v["scatter_default"] == 10 * rank
        assert v["bcast_obj_default"] == {"from": 0}
        if rank not in (1, 3):
            assert v["recv_nonmember"] == -1 and v["irecv_nonmember"] is None
            continue
        assert v["broadcast"] == 3.0
        assert v["reduce"] == (4.0 if rank == 1 else 3.0)  # only the destination changes
        assert v["gather"] == ([1.0, 3.0] if rank == 3 else None)
        assert v["scatter"] == (5.0 if rank == 1 else 6.0)
        assert v["recv_from"] == (3 if rank == 1 else 1)  # the sender's global rank
        assert v["recv"] == ([9.0] * 3 if rank == 1 else [1.0, 2.0, 3.0])
        if rank == 3:
            assert v["irecv"] == [1.0, 2.0, 3.0]
        assert v["gather_object"] == (["r1", "r3"] if rank == 1 else None)
        assert v["scatter_object"] == (("a", 1) if rank == 1 else {"b"})
        assert v["bcast_obj"] == ["x", 7]
        both, neither, outside, boolean, anysrc, anysrc_async, both_obj = v["errors"]
        assert "give src (a global rank) or group_src (a rank in the group), not both" in both
        assert both.startswith("DistUsageError")
        assert (
            neither.startswith("DistUsageError: broadcast: give src") and "not both" not in neither
        )
        assert "group_dst=2 is outside the group [1, 3]" in outside
        assert boolean.startswith("TypeError: send: group_dst must be an int rank")
        assert "receiving from any source (src=None) is not supported" in anysrc
        assert anysrc.startswith("DistUsageError: recv:")
        assert anysrc_async.startswith("DistUsageError: irecv:")
        assert "gather_object: give dst" in both_obj and "not both" in both_obj


def _objects_p2p(rank, world):
    out: dict = {}
    if rank == 0:
        dist.send_object_list([{"lr": 0.1}, (1, 2), np.arange(3), None], dst=1)
        dist.send_object_list(["late"], group_dst=2)
        dist.send_object_list([1, 2, 3], dst=1)  # rank 1 has 2 slots for it
        out["bad"] = _error(lambda: dist.send_object_list([object()], dst=1))
        out["self"] = _error(lambda: dist.send_object_list([1], dst=0))
        out["not_a_list"] = _error(lambda: dist.send_object_list((1,), dst=1))
    elif rank == 1:
        got: list = [None] * 4
        out["from"] = dist.recv_object_list(got, src=0)
        out["got"] = [got[0], got[1], got[2].tolist(), got[3]]
        short: list = [None, None]
        out["short"] = _error(lambda: dist.recv_object_list(short, 0))
        out["short_list"] = short
        out["anysrc"] = _error(lambda: dist.recv_object_list([None]))
    else:
        late: list = [None]
        out["from"] = dist.recv_object_list(late, group_src=0)
        out["got"] = late
    dist.barrier()
    return out


@pytest.mark.timeout(300)
def test_send_and_recv_object_list():
    zero, one, two = _values(run_local_ranks(_objects_p2p, 3, timeout=240))
    assert one["from"] == 0
    assert one["got"] == [{"lr": 0.1}, (1, 2), [0, 1, 2], None]
    assert (
        "recv_object_list: rank 0 sent 3 objects but rank 1's object_list has 2 slots"
        in (one["short"])
    )
    assert one["short_list"] == [None, None]  # untouched on error
    assert "receiving from any source" in one["anysrc"]
    assert two == {"from": 0, "got": ["late"]}
    assert "cannot send an object of type builtins.object" in zero["bad"]
    assert "cannot send to itself" in zero["self"]
    assert zero["not_a_list"].startswith("TypeError: send_object_list: object_list must be a list")


def _barrier_timeout(rank, world):
    from datetime import timedelta

    dist.barrier(timeout=timedelta(seconds=20))  # everyone on time
    dist.barrier(timeout=20.0, async_op=True).wait(30)
    bad = _error(lambda: dist.barrier(timeout=float("nan")))
    if rank == 1:
        time.sleep(4.0)  # late for rank 0's 1-second barrier, well within the group's 30 s
    t0 = time.monotonic()
    try:
        dist.barrier(timeout=1.0)
        outcome = "ok"
    except dist.DistError as exc:
        outcome = type(exc).__name__
    return outcome, time.monotonic() - t0, bad


@pytest.mark.timeout(300)
def test_barrier_timeout_bounds_that_barrier():
    results = run_local_ranks(_barrier_timeout, 2, timeout=240, group_timeout=30.0)
    (outcome, waited, bad), _ = _values(results)
    assert outcome == "DistTimeoutError"
    assert waited < 3.5  # its own 1 s, not the group's 30 s
    assert "barrier: timeout" in bad


def test_launcher_queries(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert dist.is_torchelastic_launched() is False
    assert dist.get_node_local_rank(fallback_rank=3) == 3
    with pytest.raises(dist.DistUsageError, match="LOCAL_RANK is not in the environment"):
        dist.get_node_local_rank()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert dist.is_torchelastic_launched() is True
    assert dist.get_node_local_rank(fallback_rank=0) == 2
    monkeypatch.setenv("LOCAL_RANK", "two")
    with pytest.raises(dist.DistUsageError, match="LOCAL_RANK='two' is not an integer"):
        dist.get_node_local_rank()


@pytest.mark.timeout(300)
def test_init_process_group_takes_torchs_positions(tmp_path):
    """torch's order: backend, init_method, timeout, world_size, rank, store."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    try:
        dist.init_process_group("gloo", None, 30, 1, 0, store)
        try:
            assert dist.get_world_size() == 1 and dist.get_rank() == 0
            solo = dist.new_group([0], use_local_synchronization=True, sort_ranks=False)
            assert dist.get_process_group_ranks(solo) == [0]
            with pytest.raises(dist.DistUsageError, match="pg_options"):
                dist.new_group([0], pg_options=object())
            g = dist.new_group([0], group_desc="solo", device_id=None)
            a = np.ones(2)
            dist.all_reduce(a, group=g)
            assert a.tolist() == [1.0, 1.0]
        finally:
            dist.destroy_process_group()
        with pytest.raises(dist.DistUsageError, match="pg_options"):
            dist.init_process_group(store=store, rank=0, world_size=1, pg_options={"x": 1})
        assert not dist.is_initialized()
    finally:
        store.close()


def _unsorted_and_local(rank, world):
    """World of 4: [3, 0, 2] with torch's sort_ranks=False (group rank i = ranks[i]), and
    two groups made by their members alone (use_local_synchronization=True)."""
    out: dict = {}
    g = dist.new_group([3, 0, 2], sort_ranks=False)
    if rank == 1:
        out["member"] = g is dist.GroupMember.NON_GROUP_MEMBER
    else:
        out["ranks"] = dist.get_process_group_ranks(g)
        out["group_rank"] = dist.get_rank(g)
        a = np.array([float(rank)])
        dist.broadcast(a, group=g, group_src=0)  # group rank 0 is global rank 3
        out["bcast"] = float(a[0])
        gathered = np.zeros(3, np.int64)
        dist.all_gather_into_tensor(gathered, np.array([rank], np.int64), group=g)
        out["gathered"] = gathered.tolist()
        s = np.array([rank + 1.0])
        dist.all_reduce(s, group=g)
        out["sum"] = float(s[0])
        blocks = [np.zeros(1, np.int64) for _ in range(3)]
        dist.all_to_all(blocks, [np.array([10 * rank + j]) for j in range(3)], group=g)
        out["a2a"] = [int(b[0]) for b in blocks]
        t = np.zeros(2)
        if rank == 3:
            dist.send(np.array([7.0, 8.0]), group=g, group_dst=2)  # group rank 2: global 2
        elif rank == 2:
            out["from"] = dist.recv(t, group=g, group_src=0)
            out["got"] = t.tolist()
    # Only the members call these; ranks 0 and 1 make two groups of [0, 1] in a row.
    if rank in (0, 1):
        first = dist.new_group([0, 1], use_local_synchronization=True)
        second = dist.new_group([1, 0], use_local_synchronization=True)
        x = np.array([rank + 1.0])
        dist.all_reduce(x, group=first)
        y = np.array([10.0 * (rank + 1)])
        dist.all_reduce(y, group=second)
        out["local"] = [float(x[0]), float(y[0]), dist.get_process_group_ranks(second)]
    else:
        other = dist.new_group([2, 3], use_local_synchronization=True)
        z = np.array([rank * 1.0])
        dist.all_reduce(z, group=other)
        out["local"] = [float(z[0])]
    # an ordinary group after the local ones: every rank still agrees on its name
    after = dist.new_group([0, 1, 2, 3])
    w = np.array([1.0])
    dist.all_reduce(w, group=after)
    out["after_local"] = float(w[0])
    out["bad"] = [
        _error(lambda: dist.new_group([0, 0])),
        _error(lambda: dist.new_group(["0", 1])),
        _error(lambda: dist.new_group([0, 9])),
    ]
    dist.barrier()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["auto", "zmq", "two-hosts"])
def test_new_group_unsorted_and_local_synchronization(transport):
    if transport == "two-hosts":  # ranks 0, 1 on one simulated host, 2, 3 on another
        env = [{"DISTRIB_NODE_ID": f"node{r // 2}"} for r in range(4)]
    else:
        env = [{"DISTRIB_TRANSPORT": transport}] * 4
    values = _values(run_local_ranks(_unsorted_and_local, 4, timeout=240, env=env))
    for rank, v in enumerate(values):
        if rank == 1:
            assert v["member"]
        else:
            assert v["ranks"] == [3, 0, 2]
            assert v["group_rank"] == [3, 0, 2].index(rank)
            assert v["bcast"] == 3.0
            assert v["gathered"] == [3, 0, 2]  # in group rank order
            assert v["sum"] == 4.0 + 1.0 + 3.0
            me = [3, 0, 2].index(rank)
            assert v["a2a"] == [10 * src + me for src in (3, 0, 2)]
        if rank == 2:
            assert v["from"] == 3 and v["got"] == [7.0, 8.0]
        if rank in (0, 1):
            assert v["local"] == [3.0, 30.0, [0, 1]]
        else:
            assert v["local"] == [5.0]
        assert v["after_local"] == 4.0
        dup, text, outside = v["bad"]
        assert "ranks must be distinct" in dup
        assert "ranks must be a list of int ranks" in text
        assert "ranks [9] are outside the world 0..3" in outside
