"""torch's all_reduce through the "distrib" backend vs distrib's own all_reduce on numpy.

All run in the same ranks, interleaved round by round, on the same sizes:
``torch.distributed.all_reduce(tensor)`` on a process group created with
``init_process_group("distrib")``; ``distrib.all_reduce(array)`` on distrib's
own default group with a numpy array; and the same on ``tensor.numpy()``, the
tensor's own memory. The first against the third is what the backend adds
(torch's Python front end, the ``.numpy()`` view, the ``Work`` and future);
the third against the second is the memory itself (numpy asks the kernel for
transparent huge pages on large arrays, torch's allocator does not, and memory
bandwidth bound copies run faster on huge pages). Reported: median
microseconds per call (float32) and the ratios.

    flock /tmp/distrib-bench.lock python benchmarks/bench_torch_backend.py
    python benchmarks/bench_torch_backend.py --nproc 2 --sizes-mib 1 4 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from distrib.testing import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def rank_main(spec: dict) -> None:
    """One rank: both groups, every size, alternating rounds; rank 0 prints JSON."""
    import numpy as np
    import torch
    import torch.distributed as dist

    import distrib
    import distrib.torch

    torch.set_num_threads(1)
    dist.init_process_group("distrib")
    distrib.init_process_group(init_method=f"tcp://127.0.0.1:{spec['port']}")
    rank = dist.get_rank()
    out = {}
    for mib in spec["sizes_mib"]:
        n = int(mib * (1 << 20)) // 4
        t = torch.ones(n)
        a = np.ones(n, np.float32)
        tv = torch.ones(n).numpy()  # a torch allocation, used through numpy
        calls = max(3, min(50, int(256 / mib)))
        for _ in range(2):  # warm up every path (segments, mappings)
            dist.all_reduce(t)
            distrib.all_reduce(a)
            distrib.all_reduce(tv)
        per: dict[str, list[float]] = {"torch": [], "distrib": [], "tensor_memory": []}
        for _ in range(spec["rounds"]):
            for name, fn in (
                ("torch", lambda t=t: dist.all_reduce(t)),
                ("distrib", lambda a=a: distrib.all_reduce(a)),
                ("tensor_memory", lambda tv=tv: distrib.all_reduce(tv)),
            ):
                distrib.barrier()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                per[name].append((time.perf_counter() - start) / calls)
        out[str(mib)] = {k: statistics.median(v) for k, v in per.items()}
    if rank == 0:
        print(json.dumps(out))
    distrib.destroy_process_group()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is kept")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--_rank", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._rank is not None:
        rank_main(json.loads(args._rank))
        return 0
    spec = json.dumps({"sizes_mib": args.sizes_mib, "rounds": args.rounds, "port": free_port()})
    port = free_port()
    procs = []
    for rank in range(args.nproc):
        env = dict(os.environ, **THREAD_ENV, RANK=str(rank), WORLD_SIZE=str(args.nproc))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        cmd = [sys.executable, os.path.abspath(__file__), "--_rank", spec]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        print(f"a rank failed: exit codes {[p.returncode for p in procs]}", file=sys.stderr)
        return 1
    result = json.loads(outs[0].strip().splitlines()[-1])
    sys.path.insert(0, HERE)
    from distrib._machine import machine

    print(
        f"# all_reduce float32, {args.nproc} ranks, median of {args.rounds} rounds; {machine().describe()}"
    )
    print(
        f"{'size':>8} | {'(a) torch/distrib us':>20} | {'(b) distrib numpy us':>20} | "
        f"{'(c) distrib t.numpy() us':>24} | {'a/b':>5} | {'a/c':>5}"
    )
    print("-" * 95)
    for mib, r in result.items():
        a, b, c = r["torch"], r["distrib"], r["tensor_memory"]
        print(
            f"{float(mib):>5g} MiB | {a * 1e6:>20.1f} | {b * 1e6:>20.1f} | {c * 1e6:>24.1f} | "
            f"{a / b:>5.2f} | {a / c:>5.2f}"
        )
    print("# a/b: the target (<= 1.3 from 1 MiB); a/c: what the backend itself adds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
