"""DistributedDataParallel across real processes: averaging, overlap, no_sync, fp16, misuse."""

from __future__ import annotations

import numpy as np
import pytest
from _ranks import rank_values

import distrib
from distrib.parallel import DistributedDataParallel, fp16_compress_hook
from distrib.testing import RankResult, run_local_ranks

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 30.0  # seconds for every collective and every join


def run_ranks(fn, world: int) -> list[RankResult]:
    """Run ``fn(rank, world)`` on ``world`` forked ranks in one process group."""
    return run_local_ranks(
        fn, world, start_method="fork", timeout=TIMEOUT + 10, group_timeout=TIMEOUT
    )


def all_ok(results: list[RankResult]) -> dict[int, object]:
    return dict(enumerate(rank_values(results)))


def _model(rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + rank)
    return {
        "l0.w": rng.standard_normal((5, 7)).astype(np.float32),
        "l0.b": rng.standard_normal(7).astype(np.float32),
        "l1.w": rng.standard_normal((7, 3)).astype(np.float32),
        "l1.b": rng.standard_normal(3).astype(np.float32),
    }


def _grads(rank: int, step: int = 0) -> dict[str, np.ndarray]:
    return {
        k: np.full(v.shape, rank + 1 + 10 * step, np.float32)
        + np.arange(v.size, dtype=np.float32).reshape(v.shape)
        for k, v in _model(0).items()
    }


# ---------------------------------------------------------------- averaging


def _average(rank, world):
    params = _model(rank)
    ddp = DistributedDataParallel(params, bucket_cap_mb=0.0001, first_bucket_mb=0.00005)
    out = {}
    for step in range(2):
        mine = _grads(rank, step)
        got = ddp.allreduce_gradients(mine)
        out[step] = (
            {k: np.array(v) for k, v in got.items()},
            {k: np.array(v) for k, v in mine.items()},
        )
    return {k: v for k, v in params.items()}, out, len(ddp.buckets)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gradients_are_averaged_and_parameters_broadcast(world):
    res = all_ok(run_ranks(_average, world))
    ref = _model(0)
    for params, steps, n_buckets in res.values():
        assert n_buckets == 4  # tiny caps: one bucket per parameter
        for k in ref:  # every replica starts from rank 0's parameters
            np.testing.assert_array_equal(params[k], ref[k])
        for step, (returned, handed_in) in steps.items():
            for k in ref:
                expect = np.mean([_grads(r, step)[k] for r in range(world)], axis=0)
                np.testing.assert_allclose(returned[k], expect, rtol=1e-6)
                np.testing.assert_allclose(handed_in[k], expect, rtol=1e-6)  # written back


def _short_last_bucket(rank, world):
    params = _model(rank)
    ddp = DistributedDataParallel(
        params, first_bucket_mb=12 / 2**20, bucket_cap_mb=1, last_bucket_mb=28 / 2**20
    )
    got = ddp.allreduce_gradients(_grads(rank))
    return [b.names for b in ddp.buckets], {k: np.array(v) for k, v in got.items()}


def test_short_last_bucket_holds_the_first_layer_and_averages():
    res = all_ok(run_ranks(_short_last_bucket, 2))
    for layout, got in res.values():
        # default layout: [l1.b], [l1.w, l0.b, l0.w]; the first layer now travels alone
        assert layout == [["l1.b"], ["l1.w"], ["l0.b", "l0.w"]]
        for k, v in got.items():
            np.testing.assert_allclose(v, np.mean([_grads(r)[k] for r in range(2)], axis=0))


# ---------------------------------------------------------------- overlap and order


def _overlap(rank, world):
    params = _model(rank)
    # first bucket: l1.b (12 bytes) alone; the rest in later buckets
    ddp = DistributedDataParallel(params, first_bucket_mb=12 / 2**20, bucket_cap_mb=1)
    first = ddp.buckets[0]
    assert first.names == ["l1.b"], first.names
    g = _grads(rank)
    ddp.grad_ready("l1.b", g["l1.b"])
    assert first.work is not None, "the first bucket was not issued when it became full"
    # The first bucket's all-reduce completes while the other gradients are still
    # "being computed": nothing else has been handed in yet.
    assert first.work.wait(timeout=TIMEOUT)
    early = np.array(ddp.grads["l1.b"])
    assert all(b.work is None for b in ddp.buckets[1:])
    for name in ["l1.w", "l0.b", "l0.w"]:
        ddp.grad_ready(name, g[name])
    ddp.synchronize()
    return early, [b.names for b in ddp.buckets]


def test_first_bucket_reduced_before_last_gradient_is_handed_in():
    res = all_ok(run_ranks(_overlap, 2))
    expect = np.mean([_grads(r)["l1.b"] for r in range(2)], axis=0)
    for early, names in res.values():
        np.testing.assert_allclose(early, expect, rtol=1e-6)
        assert names == [["l1.b"], ["l1.w", "l0.b", "l0.w"]]


def _any_order(rank, world):
    params = _model(rank)
    ddp = DistributedDataParallel(params, bucket_cap_mb=0.0001, first_bucket_mb=0.00005)
    g = _grads(rank)
    order = list(g) if rank % 2 == 0 else list(reversed(g))  # ranks disagree on order
    for name in order:
        ddp.grad_ready(name, g[name])
    return {k: np.array(v) for k, v in ddp.synchronize().items()}


def test_ranks_handing_gradients_in_different_orders_still_agree():
    res = all_ok(run_ranks(_any_order, 3))
    for k in _model(0):
        expect = np.mean([_grads(r)[k] for r in range(3)], axis=0)
        for got in res.values():
            np.testing.assert_allclose(got[k], expect, rtol=1e-6)


# ---------------------------------------------------------------- no_sync, fp16, zero-copy


def _no_sync(rank, world):
    params = _model(rank)
    ddp = DistributedDataParallel(params, bucket_cap_mb=0.0001, first_bucket_mb=0.00005)
    for micro in range(2):
        with ddp.no_sync():
            for k, v in _grads(rank, micro).items():
                ddp.grad_ready(k, v)
        assert all(b.work is None for b in ddp.buckets), "no_sync communicated"
    for k, v in _grads(rank, 2).items():
        ddp.grad_ready(k, v)
    return {k: np.array(v) for k, v in ddp.synchronize().items()}


def test_no_sync_accumulates_then_averages_the_sum():
    res = all_ok(run_ranks(_no_sync, 2))
    for k in _model(0):
        expect = np.mean([sum(_grads(r, s)[k] for s in range(3)) for r in range(2)], axis=0)
        for got in res.values():
            np.testing.assert_allclose(got[k], expect, rtol=1e-6)


def _fp16(rank, world):
    params = _model(rank)
    ddp = DistributedDataParallel(params, comm_hook=fp16_compress_hook)
    got = ddp.allreduce_gradients(_grads(rank))
    assert all(v.dtype == np.float32 for v in got.values())
    assert all(b.comm_buf is not None and b.comm_buf.dtype == np.float16 for b in ddp.buckets)
    return {k: np.array(v) for k, v in got.items()}


def test_fp16_hook_communicates_half_keeps_float32():
    res = all_ok(run_ranks(_fp16, 2))
    for k in _model(0):
        expect = np.mean([_grads(r)[k] for r in range(2)], axis=0)
        for got in res.values():
            np.testing.assert_allclose(got[k], expect, rtol=2e-3)


def _zero_copy(rank, world):
    params = _model(rank)
    ddp = DistributedDataParallel(params)
    g = _grads(rank)
    for k in reversed(list(g)):
        ddp.grads[k][...] = g[k]  # write straight into the bucket
        ddp.grad_ready(k, ddp.grads[k])
    view_before = ddp.grads["l0.w"]
    out = ddp.synchronize()
    assert out["l0.w"] is view_before  # same memory every step
    return {k: np.array(v) for k, v in out.items()}


def test_gradients_written_into_bucket_views():
    res = all_ok(run_ranks(_zero_copy, 2))
    for k in _model(0):
        expect = np.mean([_grads(r)[k] for r in range(2)], axis=0)
        for got in res.values():
            np.testing.assert_allclose(got[k], expect, rtol=1e-6)


# ---------------------------------------------------------------- misuse


def _misuse(rank, world):
    for bad in ({"last_bucket_mb": 0}, {"bucket_cap_mb": -1}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}={next(iter(bad.values()))}"):
            DistributedDataParallel(_model(rank), **bad)
    ddp = DistributedDataParallel(_model(rank))
    g = _grads(rank)
    msgs = []
    with pytest.raises(distrib.DistUsageError) as e:
        ddp.grad_ready("nope", g["l0.w"])
    msgs.append(str(e.value))
    ddp.grad_ready("l0.w", g["l0.w"])
    with pytest.raises(distrib.DistUsageError) as e:
        ddp.grad_ready("l0.w", g["l0.w"])
    msgs.append(str(e.value))
    with pytest.raises(distrib.DistUsageError) as e:
        ddp.grad_ready("l1.w", np.ones((2, 2), np.float32))
    msgs.append(str(e.value))
    with pytest.raises(distrib.DistUsageError) as e:
        ddp.synchronize()
    msgs.append(str(e.value))
    for k in ["l0.b", "l1.w", "l1.b"]:
        ddp.grad_ready(k, g[k])
    ddp.synchronize()  # still usable after the errors
    return msgs


def test_misuse_errors_name_the_problem():
    res = all_ok(run_ranks(_misuse, 2))
    for rank, msgs in res.items():
        assert "unknown parameter 'nope'" in msgs[0]
        assert "'l0.w' handed in twice" in msgs[1]
        assert "shape (2, 2)" in msgs[2] and "(7, 3)" in msgs[2]
        assert "['l0.b', 'l1.w', 'l1.b']" in msgs[3] and f"rank {rank}" in msgs[3]


def _mismatch(rank, world):
    params = _model(0)
    if rank == 1:
        params["l1.w"] = np.zeros((7, 4), np.float32)
        params["extra"] = np.zeros(2, np.float32)
    try:
        DistributedDataParallel(params)
    except distrib.DistMismatchError as exc:
        return str(exc)
    return None


def test_replicas_with_different_parameters_fail_at_construction():
    res = all_ok(run_ranks(_mismatch, 2))
    for msg in res.values():
        assert msg is not None
        assert "only on rank 1: ['extra']" in msg
        assert "l1.w" in msg and "(7, 4)" in msg


def test_no_process_group_is_a_clear_error():
    if distrib.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(distrib.DistUsageError, match="init_process_group"):
        DistributedDataParallel(_model(0))
    with pytest.raises(TypeError, match="non-empty mapping"):
        DistributedDataParallel({})
