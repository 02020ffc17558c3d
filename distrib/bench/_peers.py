"""Run the same benchmark with torch.distributed (gloo) and mpi4py, in another interpreter.

The peers may live in another interpreter (``--peer-python``, default
``$DISTRIB_PEER_PYTHON`` or this one when it has torch or mpi4py), so each is driven through a small script written
to a temporary file: the torch script is started once per rank (RANK /
WORLD_SIZE / a tcp:// init method on 127.0.0.1), the mpi4py one under
``mpirun``. Rank 0 prints one JSON line: ``[[op, [[size, seconds], ...]], ...]``.
Timing is identical to ours (warm-up, barrier, mean of back-to-back calls,
max over ranks), and so is the buffer rotation: a plan step's ``buffers``
gives, per size, how many buffer sets each rank cycles through, all written
before the timing, warm-up on the last sets, timed calls from the first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

from ..testing import free_port

__all__ = ["run_gloo", "run_mpi4py"]

_COMMON = r"""
import json, sys, time
import numpy as np

def iterations(nbytes, budget_bytes=1.5e9, lo=5, hi=300):
    return int(min(hi, max(lo, budget_bytes // max(nbytes, 1))))

def buffers(op, nbytes, n, itemsize):
    count = max(1, nbytes // itemsize)
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        block = max(1, count // n)
        return block * n, block
    return count, None

def written(count, dtype):
    # np.zeros may map untouched pages; fill them so no page fault lands in the timing.
    a = np.empty(count, dtype); a.fill(0); return a
"""

_TORCH = (
    _COMMON
    + r"""
import os
import torch
import torch.distributed as dist

def make_call(op, big, small, dtype, rank, n):
    # torch.zeros writes its zeros: every page is touched before the timing.
    a = torch.zeros(big, dtype=dtype)
    b = torch.zeros(small, dtype=dtype) if small else None
    if op == "all_reduce": return lambda: dist.all_reduce(a)
    if op == "broadcast": return lambda: dist.broadcast(a, 0)
    if op == "reduce": return lambda: dist.reduce(a, 0)
    if op == "barrier": return lambda: dist.barrier()
    if op == "all_gather": return lambda: dist.all_gather_into_tensor(a, b)
    if op == "reduce_scatter": return lambda: dist.reduce_scatter_tensor(b, a)
    if op == "all_to_all":
        o = torch.zeros_like(a); return lambda: dist.all_to_all_single(o, a)
    if op == "gather":
        gl = [torch.zeros_like(b) for _ in range(n)] if rank == 0 else None
        return lambda: dist.gather(b, gl, dst=0)
    if op == "scatter":
        sl = [torch.ones_like(b) for _ in range(n)] if rank == 0 else None
        return lambda: dist.scatter(b, sl, src=0)
    raise SystemExit("unsupported op " + op)

def main():
    plan = json.loads(sys.argv[1])
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=rank, world_size=n)
    torch.set_num_threads(1)
    out = []
    for step in plan:
        op, dtype = step["op"], getattr(torch, step["dtype"])
        res = []
        sets_per_size = step.get("buffers") or [1] * len(step["sizes"])
        for nbytes, sets in zip(step["sizes"], sets_per_size):
            big, small = buffers(op, nbytes, n, torch.tensor([], dtype=dtype).element_size())
            calls = [make_call(op, big, small, dtype, rank, n) for _ in range(sets)]
            iters = iterations(nbytes)
            try:
                for j in range(2): calls[(sets - 2 + j) % sets]()
            except RuntimeError:
                res.append([nbytes, None]); continue
            dist.barrier()
            t = time.perf_counter()
            for i in range(iters): calls[i % sets]()
            mine = torch.tensor([(time.perf_counter() - t) / iters], dtype=torch.float64)
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            res.append([nbytes, float(mine[0])])
        out.append([op, res])
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()

main()
"""
)

_MPI = (
    _COMMON
    + r"""
from mpi4py import MPI

def make_call(comm, op, big, small, dtype):
    a = written(big, dtype)
    b = written(small, dtype) if small else None
    if op == "all_reduce": return lambda: comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
    if op == "broadcast": return lambda: comm.Bcast(a, root=0)
    if op == "reduce":
        r = written(big, dtype); return lambda: comm.Reduce(a, r, op=MPI.SUM, root=0)
    if op == "barrier": return lambda: comm.Barrier()
    if op == "all_gather": return lambda: comm.Allgather(b, a)
    if op == "reduce_scatter": return lambda: comm.Reduce_scatter_block(a, b, op=MPI.SUM)
    if op == "all_to_all":
        o = written(big, dtype); return lambda: comm.Alltoall(a, o)
    if op == "gather": return lambda: comm.Gather(b, a, root=0)
    if op == "scatter": return lambda: comm.Scatter(a, b, root=0)
    raise SystemExit("unsupported op " + op)

def main():
    plan = json.loads(sys.argv[1])
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    out = []
    for step in plan:
        op, dtype = step["op"], np.dtype(step["dtype"])
        res = []
        sets_per_size = step.get("buffers") or [1] * len(step["sizes"])
        for nbytes, sets in zip(step["sizes"], sets_per_size):
            big, small = buffers(op, nbytes, n, dtype.itemsize)
            calls = [make_call(comm, op, big, small, dtype) for _ in range(sets)]
            iters = iterations(nbytes)
            for j in range(2): calls[(sets - 2 + j) % sets]()
            comm.Barrier()
            t = time.perf_counter()
            for i in range(iters): calls[i % sets]()
            mine = (time.perf_counter() - t) / iters
            res.append([nbytes, comm.allreduce(mine, op=MPI.MAX)])
        out.append([op, res])
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)

main()
"""
)


def _script(text: str) -> str:
    fd, path = tempfile.mkstemp(prefix="distrib-bench-peer-", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _parse(stdout: str) -> list[Any]:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError("peer printed no RESULT line")


def run_gloo(python: str, nproc: int, plan: list[dict[str, Any]], timeout: float) -> list[Any]:
    """Run ``plan`` with torch.distributed's gloo backend on ``nproc`` local ranks."""
    path = _script(_TORCH)
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = []
    try:
        for rank in range(nproc):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "INIT": init,
                "OMP_NUM_THREADS": "1",
            }
            procs.append(
                subprocess.Popen(
                    [python, path, json.dumps(plan)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        os.unlink(path)
    if procs[0].returncode != 0:
        raise RuntimeError(f"gloo peer failed: {outs[0][1][-2000:]}")
    return _parse(outs[0][0])


def run_mpi4py(python: str, nproc: int, plan: list[dict[str, Any]], timeout: float) -> list[Any]:
    """Run ``plan`` with mpi4py under ``mpirun`` (Open MPI's default transports)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise RuntimeError("mpirun not found")
    path = _script(_MPI)
    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": "1",
    }
    try:
        proc = subprocess.run(
            [mpirun, "--oversubscribe", "-n", str(nproc), python, path, json.dumps(plan)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        raise RuntimeError(f"mpi4py peer failed: {proc.stderr[-2000:]}")
    return _parse(proc.stdout)
