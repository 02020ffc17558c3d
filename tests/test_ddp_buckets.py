"""Bucket assignment (reverse order, first and last buckets small, caps, dtypes) and flat views."""

from __future__ import annotations

import numpy as np
import pytest

from distrib.parallel._buckets import ParamSpec, assign_buckets, build_buckets

pytestmark = pytest.mark.timeout(30)

F32 = np.dtype(np.float32)


def _specs(*sizes: int, dtype=F32) -> list[ParamSpec]:
    return [ParamSpec(f"p{i}", (n,), np.dtype(dtype)) for i, n in enumerate(sizes)]


def test_reverse_registration_order_and_small_first_bucket():
    specs = _specs(100, 100, 100, 100, 100)  # 400 bytes each
    groups = assign_buckets(specs, first_cap_bytes=400, cap_bytes=1200)
    assert groups == [["p4"], ["p3", "p2", "p1"], ["p0"]]


def test_parameter_larger_than_cap_gets_its_own_bucket():
    specs = _specs(10, 1000, 10)
    groups = assign_buckets(specs, first_cap_bytes=100, cap_bytes=100)
    assert groups == [["p2"], ["p1"], ["p0"]]


def test_bucket_sizes_respect_caps():
    rng = np.random.default_rng(0)
    specs = _specs(*rng.integers(1, 5000, size=50).tolist())
    first, cap = 4096, 16384
    groups = assign_buckets(specs, first_cap_bytes=first, cap_bytes=cap)
    by = {s.name: s for s in specs}
    flat = [n for g in groups for n in g]
    assert flat == [s.name for s in reversed(specs)]
    for i, g in enumerate(groups):
        size = sum(by[n].nbytes for n in g)
        limit = first if i == 0 else cap
        assert size <= limit or len(g) == 1


def test_dtype_change_closes_a_bucket():
    specs = [
        ParamSpec("a", (4,), np.dtype(np.float32)),
        ParamSpec("b", (4,), np.dtype(np.float64)),
        ParamSpec("c", (4,), np.dtype(np.float64)),
    ]
    assert assign_buckets(specs, first_cap_bytes=10**6, cap_bytes=10**6) == [["c", "b"], ["a"]]


def test_views_alias_the_flat_buffer():
    specs = [ParamSpec("w", (3, 4), F32), ParamSpec("b", (4,), F32)]
    (bucket,) = build_buckets(specs, assign_buckets(specs, first_cap_bytes=10**6, cap_bytes=10**6))
    assert bucket.names == ["b", "w"] and bucket.flat.shape == (16,)
    assert bucket.offsets == {"b": (0, 4), "w": (4, 16)}
    bucket.views["w"][...] = 2.0
    bucket.views["b"][...] = 1.0
    np.testing.assert_array_equal(bucket.flat, [1.0] * 4 + [2.0] * 12)
    assert bucket.views["w"].shape == (3, 4) and np.shares_memory(bucket.views["w"], bucket.flat)


def test_last_bucket_holds_the_first_parameter_and_small_followers():
    # An MLP's layout (w0, b0, w1, b1, w2, b2, w3, b3), the benchmark's shape scaled down.
    specs = _specs(2000, 10, 4000, 10, 4000, 10, 50, 5)
    plain = assign_buckets(specs, first_cap_bytes=400, cap_bytes=25000)
    assert plain == [["p7", "p6", "p5"], ["p4", "p3"], ["p2", "p1", "p0"]]
    # w0's gradient comes last; with a last bucket, w1 (which comes a layer earlier)
    # no longer waits for it: only w0 and its bias are left once backward ends.
    groups = assign_buckets(specs, first_cap_bytes=400, cap_bytes=25000, last_cap_bytes=100)
    assert groups == [["p7", "p6", "p5"], ["p4", "p3"], ["p2"], ["p1", "p0"]]


def test_last_bucket_never_takes_the_first_bucket_or_passes_the_caps():
    specs = _specs(10, 10, 10)
    # everything fits the first bucket: no separate last bucket
    assert assign_buckets(specs, first_cap_bytes=10**6, cap_bytes=10**6, last_cap_bytes=10**6) == [
        ["p2", "p1", "p0"]
    ]
    # the ordinary cap bounds what the last bucket adds, as does a dtype change
    specs = _specs(10, 10, 10, 10)
    assert assign_buckets(specs, first_cap_bytes=40, cap_bytes=40, last_cap_bytes=10**6) == [
        ["p3"],
        ["p2"],
        ["p1", "p0"],
    ]
    mixed = [
        ParamSpec("a", (4,), np.dtype(np.float64)),
        ParamSpec("b", (4,), np.dtype(np.float32)),
        ParamSpec("c", (4,), np.dtype(np.float32)),
        ParamSpec("d", (4,), np.dtype(np.float32)),
    ]
    assert assign_buckets(mixed, first_cap_bytes=16, cap_bytes=10**6, last_cap_bytes=10**6) == [
        ["d"],
        ["c", "b"],
        ["a"],
    ]


def test_bad_caps_rejected():
    with pytest.raises(ValueError, match="must be > 0"):
        assign_buckets(_specs(1), first_cap_bytes=0, cap_bytes=10)
    with pytest.raises(ValueError, match="must be > 0"):
        assign_buckets(_specs(1), first_cap_bytes=10, cap_bytes=10, last_cap_bytes=0)
