"""DistributedSampler follows torch's semantics: shards, padding, drop_last, epochs."""

from __future__ import annotations

import numpy as np
import pytest

from distrib.data import DistributedSampler

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("n", [0, 1, 7, 10, 12, 13])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_shards_cover_dataset_with_wraparound_padding(n, replicas):
    shards = [list(DistributedSampler(n, replicas, r, shuffle=False)) for r in range(replicas)]
    expect_len = -(-n // replicas)
    assert all(len(s) == expect_len for s in shards)
    if n:
        padded = list(range(n)) + list(np.resize(np.arange(n), expect_len * replicas - n))
        for r, shard in enumerate(shards):
            assert shard == padded[r::replicas]
        assert set().union(*map(set, shards)) == set(range(n))


@pytest.mark.parametrize("n,replicas", [(10, 3), (12, 4), (7, 2), (2, 4)])
def test_drop_last_gives_disjoint_equal_shards(n, replicas):
    shards = [DistributedSampler(n, replicas, r, drop_last=True, seed=5) for r in range(replicas)]
    lens = {len(s) for s in shards}
    assert len(lens) == 1
    per = lens.pop()
    assert per == n // replicas
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == per * replicas


def test_shuffle_depends_on_seed_and_epoch_and_agrees_across_ranks():
    a = DistributedSampler(100, 2, 0, seed=1)
    b = DistributedSampler(100, 2, 1, seed=1)
    e0 = (list(a), list(b))
    assert sorted(e0[0] + e0[1]) == list(range(100))
    assert e0[0] != list(range(0, 100, 2))  # actually shuffled
    assert list(DistributedSampler(100, 2, 0, seed=1)) == e0[0]  # deterministic
    a.set_epoch(1)
    b.set_epoch(1)
    e1 = (list(a), list(b))
    assert e1[0] != e0[0] and sorted(e1[0] + e1[1]) == list(range(100))
    assert list(DistributedSampler(100, 2, 0, seed=2)) != e0[0]


def test_len_and_accepts_sized_dataset():
    s = DistributedSampler(list(range(11)), num_replicas=4, rank=3)
    assert len(s) == 3 and len(list(s)) == 3
    assert s.indices().dtype == np.int64


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank=2 is out of range"):
        DistributedSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas=0"):
        DistributedSampler(10, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="dataset_len=-1"):
        DistributedSampler(-1, num_replicas=1, rank=0)
    with pytest.raises(TypeError, match="dataset_len"):
        DistributedSampler(1.5, num_replicas=1, rank=0)


def _sampler_defaults(rank, world):
    s = DistributedSampler(10)
    return (s.rank, s.num_replicas, list(s))


@pytest.mark.timeout(90)
def test_defaults_come_from_the_process_group():
    from tests.test_ddp import all_ok, run_ranks

    res = all_ok(run_ranks(_sampler_defaults, 2))
    assert {r: v[:2] for r, v in res.items()} == {0: (0, 2), 1: (1, 2)}
    assert sorted(res[0][2] + res[1][2]) == list(range(10))


def test_without_a_process_group_the_error_says_what_to_pass():
    with pytest.raises(ValueError, match="pass num_replicas and rank"):
        DistributedSampler(10)
