"""DistributedDataParallel over cupy arrays: buckets on the GPU, averaged by the GPU engine.

Both ranks share one device (the CUDA-IPC engine). Needs cupy and a CUDA device;
skips cleanly otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
from _gpu import cupy_or_skip
from _ranks import by_rank

cupy_or_skip()

from distrib.testing import run_local_ranks  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120)]


def _rank(rank, world):
    import cupy

    from distrib.parallel import DistributedDataParallel, fp16_compress_hook

    out = {}
    for hook_name in ("allreduce", "fp16"):
        params = {
            "w": cupy.full((64, 32), rank + 1.0, dtype=cupy.float32),
            "b": cupy.full(32, rank + 1.0, dtype=cupy.float32),
        }
        kwargs = {"comm_hook": fp16_compress_hook} if hook_name == "fp16" else {}
        ddp = DistributedDataParallel(params, first_bucket_mb=0.0001, **kwargs)
        grads = {k: cupy.full(v.shape, 2.0 * (rank + 1), cupy.float32) for k, v in params.items()}
        got = ddp.allreduce_gradients(grads)
        out[hook_name] = {
            "params_w": float(params["w"].mean().get()),
            "grad_w": cupy.asnumpy(got["w"]),
            "written_back": cupy.asnumpy(grads["b"]),
            "bucket_is_cupy": type(ddp.buckets[0].flat).__module__.startswith("cupy"),
        }
    return out


def test_ddp_on_cupy_arrays_two_ranks_one_gpu():
    world = 2
    # spawned ranks (CUDA does not survive fork) in one process group
    results = run_local_ranks(_rank, world, timeout=100, group_timeout=60)
    out = by_rank(results)
    assert len(out) == world, f"only ranks {sorted(out)} reported"
    expect = np.mean([2.0 * (r + 1) for r in range(world)])
    for rank, (status, value) in out.items():
        assert status == "ok", f"rank {rank}: {value}"
        for hook_name, res in value.items():
            assert res["bucket_is_cupy"], hook_name
            assert res["params_w"] == 1.0, (hook_name, "rank 0's parameters were not broadcast")
            np.testing.assert_allclose(res["grad_w"], expect, rtol=1e-3, err_msg=hook_name)
            np.testing.assert_allclose(res["written_back"], expect, rtol=1e-3, err_msg=hook_name)
