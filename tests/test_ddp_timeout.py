"""DistributedDataParallel.synchronize(timeout=...): a late replica gives a bucket error."""

from __future__ import annotations

import time

import numpy as np
import pytest

from distrib.testing import run_local_ranks

pytestmark = pytest.mark.timeout(90)


def _late_replica(rank: int, world: int) -> str:
    import distrib
    from distrib.parallel import DistributedDataParallel

    params = {"w": np.zeros(1000, np.float32)}
    ddp = DistributedDataParallel(params)
    distrib.barrier()
    if rank == 1:
        time.sleep(2.0)  # rank 0 gives up waiting meanwhile
    ddp.grad_ready("w", np.full(1000, rank + 1, np.float32))
    message = ""
    if rank == 0:
        try:
            ddp.synchronize(timeout=0.3)
        except distrib.DistTimeoutError as exc:
            message = str(exc)
    grads = ddp.synchronize()  # the all-reduce itself still completes once rank 1 arrives
    assert np.allclose(grads["w"], 1.5), grads["w"][:4]
    return message


def test_synchronize_timeout_names_the_bucket_and_the_rank():
    results = run_local_ranks(_late_replica, 2, timeout=60, group_timeout=30)
    for r in results:
        assert r.ok, r.describe()
    message = results[0].value
    assert "bucket 0" in message and "rank 0" in message and "0.3" in message, message
    assert results[1].value == ""
