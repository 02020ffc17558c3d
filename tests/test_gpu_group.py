"""The public API on cupy arrays: one group routes cupy to the GPU engine and numpy to the CPU.

Two ranks share one GPU (the CUDA-IPC engine). Needs cupy and a CUDA device.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback

import numpy as np
import pytest
from _gpu import cupy_or_skip

cupy = cupy_or_skip()

from distrib.store import TCPStore  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(90)]
SPAWN = mp.get_context("spawn")


def _group_worker(rank, size, port, out):
    try:
        import cupy

        import distrib

        cupy.cuda.Device(0).use()
        store = TCPStore("127.0.0.1", port, is_master=False, timeout=30)
        distrib.init_process_group("auto", store=store, rank=rank, world_size=size, timeout=30)
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
        distrib.destroy_process_group()
        out.put((rank, "ok"))
    except BaseException:
        out.put((rank, traceback.format_exc()))


def test_group_routes_cupy_to_the_gpu_and_numpy_to_the_cpu():
    size = 2
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=30)
    out = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_group_worker, args=(r, size, master.port, out)) for r in range(size)
    ]
    for p in procs:
        p.start()
    try:
        results = sorted(out.get(timeout=80) for _ in range(size))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        master.close()
    for rank, status in results:
        assert status == "ok", f"rank {rank}:\n{status}"
