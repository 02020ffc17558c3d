"""All-to-all with blocks of any size (torch's ``all_to_all`` lists and
``all_to_all_single`` split sizes), checked against a numpy reference on real ranks."""

from __future__ import annotations

import numpy as np
import pytest

import distrib as dist
from distrib.testing import run_local_ranks


def _values(results):
    bad = [r.describe() for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    return [r.value for r in results]


def _count(src: int, dst: int, world: int) -> int:
    """Rows rank ``src`` sends to ``dst``: uneven, some empty, and rank 0 sends and
    receives equal blocks only (its local view looks even while the others' do not)."""
    if src == 0 or dst == 0:
        return 2
    return (src * 3 + dst) % 4


def _block(src: int, dst: int, world: int, cols: int) -> np.ndarray:
    k = _count(src, dst, world)
    return (1000 * src + 100 * dst + np.arange(k * cols, dtype=np.float64)).reshape(k, cols)


def _uneven(rank, world):
    cols = 3
    out: dict = {}
    # list form: blocks of different shapes (same element counts pairwise)
    ins = [_block(rank, j, world, cols) for j in range(world)]
    outs = [np.zeros(_count(i, rank, world) * cols) for i in range(world)]  # flat receivers
    dist.all_to_all(outs, ins)
    out["list"] = [o.tolist() for o in outs]
    # single form, sync and async, with trailing dims
    inp = np.concatenate(ins)
    splits_in = [_count(rank, j, world) for j in range(world)]
    splits_out = [_count(i, rank, world) for i in range(world)]
    res = np.full((sum(splits_out), cols), -1.0)
    dist.all_to_all_single(res, inp, splits_out, splits_in)
    out["single"] = res.tolist()
    res2 = np.zeros_like(res, dtype=np.float64)
    work = dist.all_to_all_single(res2, inp, splits_out, splits_in, async_op=True)
    work.wait(60)
    out["single_async"] = res2.tolist()
    out["async_result"] = [r.shape for r in work.result()]  # torch's: [output]
    # split sizes as numpy arrays (torch takes any sequence of ints)
    res3 = np.zeros_like(res)
    dist.all_to_all_single(res3, inp, np.array(splits_out), np.array(splits_in))
    out["numpy_splits"] = res3.tolist()
    # even splits given explicitly, and on one side only (the other side splits evenly)
    even_in = np.arange(world * 2, dtype=np.int32) + 10 * rank
    even_out = np.zeros(world * 2, np.int32)
    dist.all_to_all_single(even_out, even_in, None, [2] * world)
    out["one_side"] = even_out.tolist()
    # equal list blocks still work, and interleave with other collectives in order
    eq_out = [np.zeros(2, np.int64) for _ in range(world)]
    w = dist.all_to_all(eq_out, [np.array([rank, j]) for j in range(world)], async_op=True)
    total = np.array([rank], np.int64)
    dist.all_reduce(total)
    w.wait(60)
    out["equal"] = [o.tolist() for o in eq_out]
    out["sum"] = int(total[0])
    # local argument errors name the argument, before any communication
    errors = []
    for bad in (
        lambda: dist.all_to_all_single(res, inp, splits_out, [10**6] + [0] * (world - 1)),
        lambda: dist.all_to_all_single(res, inp, splits_out, [-1, *splits_in[1:]]),
        lambda: dist.all_to_all_single(res, inp, splits_out, splits_in[:-1]),
        lambda: dist.all_to_all(outs, ins[:-1]),
        lambda: dist.all_to_all([o.astype(np.float32) for o in outs], ins),
    ):
        try:
            bad()
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_uneven_all_to_all_matches_numpy(world):
    values = _values(run_local_ranks(_uneven, world, timeout=240))
    cols = 3
    for rank, v in enumerate(values):
        want = [_block(i, rank, world, cols) for i in range(world)]
        assert v["list"] == [w.reshape(-1).tolist() for w in want]
        assert v["single"] == v["single_async"] == np.concatenate(want).tolist()
        assert v["numpy_splits"] == v["single"]
        assert v["async_result"] == [(sum(_count(i, rank, world) for i in range(world)), cols)]
        assert v["one_side"] == [10 * i + 2 * rank + k for i in range(world) for k in range(2)]
        assert v["equal"] == [[i, rank] for i in range(world)]
        assert v["sum"] == sum(range(world))
        e = v["errors"]
        assert "add up to 1000000 rows, but input has" in e[0]
        assert "must be" in e[1] and "non-negative ints" in e[1]
        if world > 1:  # one rank: an empty list means "split evenly"
            assert "non-negative ints (one per rank)" in e[2]
        assert f"expected {world} input blocks" in e[3]
        assert "every block needs the dtype of input block 0 (float64)" in e[4]


def _disagree(rank, world, what):
    if what == "sizes":
        send = [3 if (rank, j) == (1, 2) else 1 for j in range(world)]  # rank 2 expects 1
        recv = [1] * world
        data, out = np.ones(sum(send)), np.zeros(sum(recv))
    else:  # dtype
        send = recv = [1] * world
        dtype = np.float32 if rank == 2 else np.float64
        data, out = np.ones(world, dtype), np.zeros(world, dtype)
    try:
        dist.all_to_all_single(out, data, recv, send)
    except dist.DistMismatchError as exc:
        return str(exc), out.tolist()
    return "no error", out.tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("what", ["sizes", "dtype"])
def test_disagreeing_ranks_get_one_named_error_and_no_data(what):
    values = _values(run_local_ranks(_disagree, 3, what, timeout=240))
    for msg, out in values:
        if what == "sizes":
            assert "rank 1 sends 3 elements to rank 2, which expects 1 from it" in msg
        else:
            assert "mismatched collectives" in msg and "float32" in msg and "float64" in msg
        assert out == [0.0] * len(out)  # nothing moved
    if what == "sizes":
        assert len({msg for msg, _ in values}) == 1  # the same error on every rank


def _mixed_call(rank, world):
    try:
        if rank == 0:
            dist.all_to_all([np.zeros(1) for _ in range(world)], [np.ones(1)] * world)
        else:
            dist.all_reduce(np.ones(1))
    except dist.DistMismatchError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(300)
def test_a_rank_calling_something_else_is_a_mismatch():
    for msg in _values(run_local_ranks(_mixed_call, 2, timeout=240, group_timeout=30.0)):
        assert "all_to_all (block sizes)" in msg and "all_reduce" in msg
