"""Synchronous all-reduce while every rank also computes on another thread.

Each rank starts a thread that runs float32 matrix products (numpy, one BLAS
thread, the GIL released) for the whole run, then times ``all_reduce`` on its
main thread: what a rank with a data-loading or compute thread of its own sees
when ranks fill the cores. Compared side by side, the same ranks and calls:
distrib; distrib with ``DISTRIB_SHORT_SLICE=0`` (waiting threads keep the
kernel's default scheduler slice); torch gloo; Open MPI through mpi4py; and
distrib with no compute thread, the uncontended reference. Reported: median
milliseconds per call on rank 0 over every timed call of every round (each call
after a barrier), rounds alternating between the columns.

    python benchmarks/bench_contended.py
    python benchmarks/bench_contended.py --nproc 2 --sizes-mib 2 8 32 --repeat 3

torch and mpi4py come from this interpreter or ``--peer-python``; a column
whose peer is missing is left out with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from distrib._machine import machine
from distrib.bench._cli import default_peer_python
from distrib.testing import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
COLUMNS = ("distrib", "distrib-kernel-slice", "gloo", "mpi", "distrib-idle")
HEADINGS = {
    "distrib": "distrib",
    "distrib-kernel-slice": "distrib, kernel slice",
    "gloo": "torch gloo",
    "mpi": "Open MPI",
    "distrib-idle": "distrib, no compute",
}

# One rank of any column: argv[1] is the JSON spec; rank 0 prints its timings.
RANK = r"""
import json, os, sys, threading, time
import numpy as np
spec = json.loads(sys.argv[1])
kind = spec["kind"]
if kind == "mpi":
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.rank
    barrier = comm.Barrier
    def all_reduce(x):
        comm.Allreduce(MPI.IN_PLACE, x)
elif kind == "gloo":
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    barrier = dist.barrier
    def all_reduce(x):
        dist.all_reduce(torch.from_numpy(x))
else:
    import distrib
    distrib.init_process_group()
    rank = distrib.get_rank()
    barrier = distrib.barrier
    all_reduce = distrib.all_reduce
stop = threading.Event()
def compute():
    a = np.ones((32, 2048), np.float32)
    w = np.ones((2048, 2048), np.float32)
    while not stop.is_set():
        a @ w
worker = threading.Thread(target=compute, daemon=True)
if spec["compute"]:
    worker.start()
out = {}
for mib in spec["sizes_mib"]:
    x = np.ones(int(mib * (1 << 20)) // 4, np.float32)
    for _ in range(2):
        all_reduce(x)
    times = []
    for _ in range(spec["calls"]):
        barrier()
        time.sleep(0.002)
        t = time.perf_counter()
        all_reduce(x)
        times.append(time.perf_counter() - t)
    out[str(mib)] = times
stop.set()
if spec["compute"]:
    worker.join()
barrier()
if rank == 0:
    print(json.dumps(out), flush=True)
sys.stdout.flush()
if kind == "mpi":
    MPI.Finalize()
os._exit(0)  # gloo's teardown can abort after the run is over: not waited for
"""


def _env(extra: dict[str, str], rank: int = 0, n: int = 1, port: int = 0) -> dict[str, str]:
    """This environment for one rank: one BLAS thread, env:// variables, ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "DISTRIB_SHORT_SLICE"}
    env.update(THREAD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(n),
        LOCAL_WORLD_SIZE=str(n),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    env.update(extra)
    return env


def _finish(procs: list[subprocess.Popen], timeout: float, what: str) -> dict[str, list[float]]:
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: ranks did not finish within {timeout:.0f} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{what}: a rank exited with {p.returncode}:\n{err[-2000:]}")
    lines = [line for out, _ in outs for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def run_column(kind: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """One round of one column: every size, ``args.calls`` timed calls each."""
    spec = {
        "kind": "distrib" if kind.startswith("distrib") else kind,
        "compute": kind != "distrib-idle",
        "sizes_mib": args.sizes_mib,
        "calls": args.calls,
    }
    extra = {"DISTRIB_SHORT_SLICE": "0"} if kind == "distrib-kernel-slice" else {}
    python = sys.executable if kind.startswith("distrib") else args.peer_python
    if kind == "mpi":
        cmd = [args.mpirun, "--oversubscribe", "-np", str(args.nproc)]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        procs = [
            subprocess.Popen(
                [*cmd, python, "-c", RANK, json.dumps(spec)],
                env=_env(extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        ]
    else:
        port = free_port()
        procs = [
            subprocess.Popen(
                [python, "-c", RANK, json.dumps(spec)],
                env=_env(extra, r, args.nproc, port),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(args.nproc)
        ]
    return _finish(procs, args.timeout, kind)


def _has(python: str | None, module: str) -> bool:
    if python is None:
        return False
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0


def _columns(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The columns this machine can run, and a note for each left out."""
    notes = []
    columns = list(COLUMNS)
    if not _has(args.peer_python, "torch"):
        columns.remove("gloo")
        notes.append("torch gloo left out: no torch (pass --peer-python PATH)")
    if args.mpirun is None or not _has(args.peer_python, "mpi4py"):
        columns.remove("mpi")
        notes.append("Open MPI left out: no mpirun or no mpi4py (pass --peer-python PATH)")
    return columns, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[2, 8, 32])
    ap.add_argument("--calls", type=int, default=10, help="timed calls per size and round")
    ap.add_argument("--repeat", type=int, default=2, help="rounds per column, alternating")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per round")
    ap.add_argument("--peer-python", default=default_peer_python() or sys.executable)
    ap.add_argument("--mpirun", default=shutil.which("mpirun"))
    args = ap.parse_args(argv)
    columns, notes = _columns(args)
    times: dict[str, dict[str, list[float]]] = {c: {} for c in columns}
    for _ in range(args.repeat):
        for column in columns:
            for size, calls in run_column(column, args).items():
                times[column].setdefault(size, []).extend(calls)
    print(
        f"# all_reduce float32 on the main thread while a compute thread runs on every rank; "
        f"{args.nproc} ranks, median ms on rank 0 of {args.repeat} x {args.calls} calls"
    )
    print(f"# machine: {machine().describe()}; Linux {platform.release()}")
    for note in notes:
        print(f"# {note}")
    head = f"{'size':>9} | " + " | ".join(f"{HEADINGS[c]:>21}" for c in columns)
    print(head)
    print("-" * len(head))
    for mib in args.sizes_mib:
        cells = [f"{statistics.median(times[c][str(mib)]) * 1e3:>21.2f}" for c in columns]
        print(f"{f'{mib:g} MiB':>9} | " + " | ".join(cells))
    print(
        "# distrib, kernel slice: DISTRIB_SHORT_SLICE=0, waiting threads keep the kernel's "
        "default scheduler slice; distrib, no compute: the same call with no compute thread"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
