"""GPU-path logic that needs no GPU: engine choice, kernel generation, errors without cupy."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from distrib._errors import DistBackendError
from distrib._reduce_op import ReduceOp
from distrib._xp import is_cupy as is_cupy_array
from distrib.gpu._kernels import _source
from distrib.transport.gpu._select import plan_gpu_engine

pytestmark = pytest.mark.timeout(30)
HAVE_CUPY = importlib.util.find_spec("cupy") is not None


@pytest.mark.parametrize(
    ("identities", "expected"),
    [
        (["h/0000:01:00.0"], "nccl"),
        (["h/0000:01:00.0", "h/0000:02:00.0"], "nccl"),
        (["a/0000:01:00.0", "b/0000:01:00.0"], "nccl"),  # same bus id on two hosts
        (["h/0000:01:00.0"] * 4, "cuda_ipc"),
    ],
)
def test_engine_choice(identities, expected):
    assert plan_gpu_engine(identities) == expected


def test_mixed_layout_is_a_clear_error():
    with pytest.raises(DistBackendError, match=r"rank 2: h/B") as info:
        plan_gpu_engine(["h/A", "h/A", "h/B"])
    assert "own GPU" in str(info.value)


def test_numpy_is_not_a_cupy_array():
    assert not is_cupy_array(np.zeros(3))


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8", "uint64", "complex128", "bool"])
def test_fused_kernel_source_names_every_buffer(dtype):
    src = _source(np.dtype(dtype), ReduceOp.MAX if dtype != "complex128" else ReduceOp.SUM, 3, 2)
    for name in ("s0", "s1", "s2", "d0", "d1"):
        assert f"{name}[i]" in src
    assert "uint4" in src and "distrib_fused" in src


def test_avg_sums_because_the_group_divides():
    for dtype in ("float32", "bool"):
        avg = _source(np.dtype(dtype), ReduceOp.AVG, 2, 2)
        assert avg == _source(np.dtype(dtype), ReduceOp.SUM, 2, 2)
        assert "acc /" not in avg and "divisor" not in avg


@pytest.mark.skipif(HAVE_CUPY, reason="checks the error raised where cupy is missing")
def test_without_cupy_the_error_says_how_to_install():
    from multiprocessing.reduction import ForkingPickler

    from distrib.gpu._ipc import register_reducers

    with pytest.raises(DistBackendError, match=r"distrib\[gpu\]"):
        register_reducers(ForkingPickler)
