"""distrib.shm in one process: allocation, sharing, handles and the receiver cache."""

from __future__ import annotations

import os
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest

import distrib.shm as shm
from distrib.multiprocessing import ArrayPickler
from distrib.shm import _arena

pytestmark = pytest.mark.timeout(60)

DTYPES = [
    np.bool_,
    np.int8,
    np.uint16,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
    np.dtype([("x", "<f4"), ("n", "<i2"), ("tag", "S3")]),
]


def _sample(dtype, shape=(5, 7)):
    dt = np.dtype(dtype)
    raw = np.arange(int(np.prod(shape)) * dt.itemsize, dtype=np.uint8) % 251
    return raw.view(dt).reshape(shape).copy()


def roundtrip(obj):
    return pickle.loads(ArrayPickler.dumps(obj))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_allocators_return_shared_ndarrays(dtype):
    dt = np.dtype(dtype)
    a = shm.empty((4, 3), dt)
    z = shm.zeros((4, 3), dt)
    assert type(a) is np.ndarray and a.shape == (4, 3) and a.dtype == dt
    assert shm.is_shared(a) and shm.is_shared(z)
    assert not z.view(np.uint8).any()
    s = shm.share(_sample(dt))
    assert shm.is_shared(s)
    np.testing.assert_array_equal(s.view(np.uint8), _sample(dt).view(np.uint8))


def test_full_views_ufuncs_and_out():
    f = shm.full((100,), 2.5)
    assert f.dtype == np.float64 and (f == 2.5).all()
    assert shm.is_shared(f[10:20]) and shm.is_shared(f.reshape(10, 10).T)
    np.multiply(f, 2, out=f)
    assert (f == 5.0).all() and shm.is_shared(f)
    assert not shm.is_shared(f + 1)  # a ufunc result is a new private array
    assert shm.full(3, 7, dtype=np.int32).tolist() == [7, 7, 7]
    fortran = shm.zeros((3, 4), order="F")
    assert fortran.flags.f_contiguous and shm.is_shared(fortran)


def test_share_returns_shared_arrays_as_is_and_copies_private_ones():
    s = shm.zeros(10)
    assert shm.share(s) is s
    view = s[2:5]
    assert shm.share(view) is view
    private = np.arange(10.0)
    copy = shm.share(private)
    assert copy is not private and shm.is_shared(copy)
    copy[0] = 99
    assert private[0] == 0
    assert shm.share([1, 2, 3]).tolist() == [1, 2, 3]
    assert not shm.is_shared(private) and not shm.is_shared([1.0])


def test_bad_input_is_rejected_clearly():
    with pytest.raises(TypeError, match="object"):
        shm.empty(3, dtype=object)
    with pytest.raises(TypeError, match="object"):
        shm.share(np.array([1, "a"], dtype=object))
    with pytest.raises(ValueError, match="negative"):
        shm.zeros((2, -1))
    with pytest.raises(TypeError, match="shape"):
        shm.zeros("abc")
    with pytest.raises(ValueError, match="order"):
        shm.zeros(3, order="K")
    with pytest.raises(ValueError, match="sharing strategy"):
        shm.set_sharing_strategy("carrier_pigeon")


def test_zero_size_and_scalar_shapes():
    e = shm.zeros((0, 5))
    assert e.shape == (0, 5) and shm.is_shared(e)
    s = shm.full((), 3.0)
    assert s.shape == () and float(s) == 3.0
    back = roundtrip(s)
    assert back.shape == () and float(back) == 3.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_handle_is_small_and_maps_the_same_memory(dtype):
    big = shm.share(_sample(dtype, (300, 200)))
    data = ArrayPickler.dumps(big)
    assert len(data) < 600 < big.nbytes  # a handle, never the data
    back = pickle.loads(data)
    np.testing.assert_array_equal(back.view(np.uint8), big.view(np.uint8))
    back.view(np.uint8)[0, 0] ^= 0xFF
    assert big.view(np.uint8)[0, 0] == back.view(np.uint8)[0, 0]


@pytest.mark.parametrize(
    "index",
    [
        (slice(None), slice(None)),
        (slice(3, 17, 2), slice(None, None, -3)),
        (slice(None, None, -1), 5),
        (Ellipsis, slice(1, 2)),
    ],
    ids=["whole", "strided", "reversed-row", "column"],
)
def test_views_of_any_strides_travel_as_views(index):
    base = shm.share(np.arange(40 * 30, dtype=np.float32).reshape(40, 30))
    view = base[index]
    back = roundtrip(view)
    assert back.shape == view.shape and back.strides == view.strides
    np.testing.assert_array_equal(back, view)
    back[...] = -1
    assert (view == -1).all()
    assert (base == -1).sum() == view.size


def test_transposed_and_broadcast_views():
    base = shm.share(np.arange(12.0).reshape(3, 4))
    back = roundtrip(base.T)
    np.testing.assert_array_equal(back, base.T)
    bc = np.broadcast_to(base[0], (5, 4))
    np.testing.assert_array_equal(roundtrip(bc), bc)


def test_receiver_cache_maps_a_segment_once():
    a = shm.zeros(100_000)
    data = ArrayPickler.dumps(a)
    one, two = pickle.loads(data), pickle.loads(data)
    assert one.__array_interface__["data"][0] == two.__array_interface__["data"][0]
    assert shm._array.block_of(one) is shm._array.block_of(two) is shm._array.block_of(a)


def test_private_and_object_arrays_pickle_normally_or_by_copy():
    small = np.arange(4.0)  # below the inline threshold: pickled inline
    assert not shm.is_shared(roundtrip(small))
    big = np.arange(1 << 17, dtype=np.float64)  # 1 MiB: copied once into shared memory
    back = roundtrip(big)
    assert shm.is_shared(back)
    np.testing.assert_array_equal(back, big)
    back[0] = -5
    assert big[0] == 0  # the sender's private array is untouched
    objs = np.array([{"a": 1}, None, "x"], dtype=object)
    out = roundtrip(objs)
    assert out.dtype == object and out[0] == {"a": 1} and not shm.is_shared(out)


def test_stdlib_pickler_is_untouched():
    a = shm.zeros(50_000)
    assert len(ForkingPickler.dumps(a)) > a.nbytes  # stdlib still copies the data
    assert np.ndarray not in ForkingPickler._extra_reducers


def test_many_small_arrays_share_few_segments():
    fds_before = len(os.listdir("/proc/self/fd"))
    arrays = [shm.zeros(16) for _ in range(20_000)]
    segments = {id(shm._array.block_of(a).segment) for a in arrays}
    assert len(segments) <= 20_000 * 128 // _arena.SLAB_BYTES + 2
    assert len(os.listdir("/proc/self/fd")) - fds_before <= len(segments) + 2
    addresses = {a.__array_interface__["data"][0] for a in arrays}
    assert len(addresses) == len(arrays)  # no two live arrays share a slot
    arrays[5][:] = 1
    assert arrays[4].sum() == 0 and arrays[6].sum() == 0


def test_freed_private_slots_are_reused_but_handed_out_ones_are_not():
    a = shm.zeros(16)
    addr = a.__array_interface__["data"][0]
    del a
    b = shm.zeros(16)
    assert b.__array_interface__["data"][0] == addr  # recycled: never left this process
    ArrayPickler.dumps(b)  # handed out: another process may hold it
    del b
    c = shm.zeros(16)
    assert c.__array_interface__["data"][0] != addr
