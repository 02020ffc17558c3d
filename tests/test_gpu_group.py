"""The public API on cupy arrays: one group routes cupy to the GPU engine and numpy to the CPU.

Two ranks in one process group share one GPU (the CUDA-IPC engine). Needs cupy and a CUDA device.
"""

from __future__ import annotations

import numpy as np
import pytest
from _gpu import cupy_or_skip

cupy = cupy_or_skip()

from distrib.testing import run_local_ranks  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(90)]


def _group_checks(rank, size):
    import cupy

    import distrib

    cupy.cuda.Device(0).use()
    total = sum(range(1, size + 1))
    x = cupy.arange(10, dtype=cupy.float32) * (rank + 1)
    distrib.all_reduce(x)
    np.testing.assert_allclose(x.get(), np.arange(10) * total)
    y = np.ones(5) * (rank + 1)  # numpy in the same group: the CPU engine
    distrib.all_reduce(y)
    np.testing.assert_allclose(y, np.full(5, float(total)))
    z = cupy.full(7, float(rank))
    distrib.all_reduce(z, op=distrib.ReduceOp.AVG)
    np.testing.assert_allclose(z.get(), np.full(7, (size - 1) / 2))
    w = cupy.full(1000, rank + 1.0)
    work = distrib.all_reduce(w, async_op=True)
    work.wait()
    np.testing.assert_allclose(w.get(), np.full(1000, float(total)))
    m = cupy.ones((4, 6)) * (rank + 1)
    distrib.all_reduce(m[:, ::2])  # a strided view: written back in place
    expect = np.ones((4, 6)) * (rank + 1)
    expect[:, ::2] = total
    np.testing.assert_allclose(m.get(), expect)
    b = cupy.arange(5.0) if rank == 0 else cupy.zeros(5)
    distrib.broadcast(b, src=0)
    np.testing.assert_allclose(b.get(), np.arange(5.0))


def test_group_routes_cupy_to_the_gpu_and_numpy_to_the_cpu():
    results = run_local_ranks(_group_checks, 2, timeout=80, group_timeout=30)
    for result in results:
        assert result.ok, result.describe()
