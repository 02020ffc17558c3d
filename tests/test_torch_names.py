"""torch.distributed names added for torch users: group queries, subgroups, batched p2p,
monitored_barrier, group.WORLD (real ranks over a real store)."""

from __future__ import annotations

import numpy as np
import pytest

import distrib as dist
from distrib.testing import run_local_ranks


def _assert_all_ok(results):
    bad = [r.describe() for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    return [r.value for r in results]


def _queries(rank, world):
    out = {"available": dist.is_available(), "world_is_default": dist.group.WORLD is not None}
    out["member_world"] = dist.GroupMember.WORLD is dist.group.WORLD
    out["world_ranks"] = dist.get_process_group_ranks(None)
    out["world_ranks_obj"] = dist.get_process_group_ranks(dist.group.WORLD)
    odd = dist.new_group([1, 3])
    if rank in (1, 3):
        out["odd_ranks"] = dist.get_process_group_ranks(odd)
        out["g2l"] = dist.get_group_rank(odd, 3)
        out["l2g"] = dist.get_global_rank(odd, 1)
        for bad in (lambda: dist.get_group_rank(odd, 2), lambda: dist.get_global_rank(odd, 2)):
            try:
                bad()
            except ValueError as exc:
                out.setdefault("errors", []).append(str(exc))
    else:
        out["odd"] = odd is dist.GroupMember.NON_GROUP_MEMBER
    cur, subs = dist.new_subgroups(2)
    out["sub_ranks"] = dist.get_process_group_ranks(cur)
    out["n_subs"] = len(subs)
    a = np.array([rank + 1.0])
    dist.all_reduce(a, group=cur)
    out["sub_sum"] = float(a[0])
    cur2, subs2 = dist.new_subgroups_by_enumeration([[0, 2], [1]])
    out["enum"] = None if cur2 is None else dist.get_process_group_ranks(cur2)
    out["enum_members"] = [s is not dist.GroupMember.NON_GROUP_MEMBER for s in subs2]
    try:
        dist.new_subgroups(3)
    except ValueError as exc:
        out["indivisible"] = str(exc)
    out["pg_count"] = dist.get_pg_count()
    # group.WORLD works wherever group= is accepted
    b = np.array([1.0])
    dist.all_reduce(b, group=dist.group.WORLD)
    out["world_sum"] = float(b[0])
    return out


@pytest.mark.timeout(300)
def test_group_queries_and_subgroups():
    values = _assert_all_ok(run_local_ranks(_queries, 4, timeout=240))
    for rank, v in enumerate(values):
        assert v["available"] and v["world_is_default"] and v["member_world"]
        assert v["world_ranks"] == v["world_ranks_obj"] == [0, 1, 2, 3]
        if rank in (1, 3):
            assert v["odd_ranks"] == [1, 3] and v["g2l"] == 1 and v["l2g"] == 3
            assert "global rank 2 is not part of group [1, 3]" in v["errors"][0]
            assert "group rank 2 is not part of group [1, 3]" in v["errors"][1]
        else:
            assert v["odd"]
        assert v["sub_ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1] and v["n_subs"] == 2
        assert v["sub_sum"] == {0: 3.0, 1: 3.0, 2: 7.0, 3: 7.0}[rank]
        assert v["enum"] == {0: [0, 2], 1: [1], 2: [0, 2], 3: None}[rank]
        assert v["enum_members"] == [rank in (0, 2), rank == 1]
        assert "not divisible by group_size 3" in v["indivisible"]
        assert v["pg_count"] == 1 + 1 + 2 + 2
        assert v["world_sum"] == 4.0


def test_world_is_none_before_init():
    assert dist.group.WORLD is None and dist.GroupMember.WORLD is None
    assert dist.is_available() is True


def _ring(rank, world):
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    send = np.arange(5, dtype=np.float32) + 10 * rank
    got = np.zeros(5, np.float32)
    got2 = np.zeros(5, np.float32)
    # receives listed first on even ranks, sends first on odd ones: any order completes
    ops = [
        dist.P2POp(dist.isend, send, nxt, tag=7),
        dist.P2POp(dist.irecv, got, prv, tag=7),
        dist.P2POp(dist.isend, send * 2, group_peer=prv, tag=8),
        dist.P2POp(dist.irecv, got2, group_peer=nxt, tag=8),
    ]
    if rank % 2 == 0:
        ops.reverse()
    works = dist.batch_isend_irecv(ops)
    for w in works:
        w.wait(30)
    errors = []
    for bad in (
        lambda: dist.P2POp(dist.all_reduce, send, nxt),
        lambda: dist.P2POp(dist.isend, send),
        lambda: dist.batch_isend_irecv([]),
        lambda: dist.batch_isend_irecv([object()]),
    ):
        try:
            bad()
        except (ValueError, TypeError) as exc:
            errors.append(type(exc).__name__ + ": " + str(exc))
    return got.tolist(), got2.tolist(), len(works), errors


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_batch_isend_irecv_ring(world):
    values = _assert_all_ok(run_local_ranks(_ring, world, timeout=240))
    for rank, (got, got2, n, errors) in enumerate(values):
        prv, nxt = (rank - 1) % world, (rank + 1) % world
        assert got == [10.0 * prv + i for i in range(5)]
        assert got2 == [2 * (10.0 * nxt + i) for i in range(5)]
        assert n == 4
        assert "op must be distrib.isend or distrib.irecv" in errors[0]
        assert "exactly one of peer" in errors[1]
        assert "non-empty list" in errors[2]
        assert errors[3].startswith("TypeError: batch_isend_irecv: every item must be a P2POp")


def _monitored(rank, world, late, wait_all):
    import time

    dist.monitored_barrier(timeout=20)  # everyone on time
    if rank in late:
        time.sleep(3.0)  # arrives after rank 0 gave up
    try:
        dist.monitored_barrier(timeout=1.0, wait_all_ranks=wait_all)
    except dist.DistTimeoutError as exc:
        return str(exc)
    return "ok"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("wait_all", [False, True])
def test_monitored_barrier_names_missing_ranks(wait_all):
    values = _assert_all_ok(run_local_ranks(_monitored, 4, (1, 3), wait_all, timeout=240))
    expected = "[1, 3]" if wait_all else "[1]"
    for msg in values:
        assert f"rank(s) {expected} of group [0, 1, 2, 3] did not arrive within 1.0 s" in msg


def _monitored_ok(rank, world):
    for _ in range(3):
        dist.monitored_barrier(timeout=20)
    return "ok"


@pytest.mark.timeout(300)
def test_monitored_barrier_passes():
    assert _assert_all_ok(run_local_ranks(_monitored_ok, 3, timeout=240)) == ["ok"] * 3
