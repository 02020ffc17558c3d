"""distrib on Ray: start-up time, and all-reduce through Ray-placed ranks vs distrib-run.

1. Start-up: wall time of ``distrib.ray.run`` of a trivial N-worker function
   (each rank joins the process group, passes a barrier and returns its rank)
   from the call to its results, beside Ray Train's ``TorchTrainer`` with N
   workers running an empty training function (its workers join a torch gloo
   group) on the same Ray instance. Median and best of ``--startup-repeat`` runs.
2. All-reduce bus bandwidth (nccl-tests' busbw) of M ranks placed by Ray on one
   node (STRICT_PACK) beside the same M ranks under ``distrib-run --nproc M``,
   runs interleaved, best of ``--repeat`` per size; each run makes an untimed
   pass over the sizes before the timed one, on both sides. M is one rank per
   usable core, at most N (``--allreduce-nproc``): with more ranks than cores,
   every wait in a collective is a sleep and a wake-up, and what is measured
   is how the OS scheduler treats Ray's own processes, not distrib's transport.

A private single-node Ray instance on 127.0.0.1 is started (``--cpus`` logical CPUs).

    python benchmarks/bench_ray.py [--nproc 4] [--allreduce-nproc M] [--repeat 9]
        [--sizes 64K,1M,16M,64M]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from distrib._machine import machine

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DISTRIB_RUN_RANK = """
import json, sys
import distrib
from distrib.bench._worker import time_op
distrib.init_process_group()
sizes = [int(s) for s in sys.argv[1].split(",")]
time_op("all_reduce", sizes, "float32")  # warm-up pass, untimed (as under Ray)
res = time_op("all_reduce", sizes, "float32")
if distrib.get_rank() == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(res, f)
distrib.destroy_process_group()
"""


def _machine() -> str:
    import ray

    return (
        f"machine: {machine().describe()}, Python {platform.python_version()}, "
        f"Ray {ray.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if mult > 1 else text) * mult


def _fmt_size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


# ---------------------------------------------------------------- the ranks


def _trivial_rank() -> int:
    import distrib

    distrib.init_process_group()
    distrib.barrier()
    rank = distrib.get_rank()
    distrib.destroy_process_group()
    return rank


def _allreduce_rank(sizes: list[int]) -> Any:
    import distrib
    from distrib.bench._worker import time_op

    distrib.init_process_group()
    try:
        # A warm-up pass first, on both sides: the first second after start-up also
        # carries the launcher's own work (Ray registers and reports new workers).
        time_op("all_reduce", sizes, "float32")
        return time_op("all_reduce", sizes, "float32")
    finally:
        distrib.destroy_process_group()


def _train_loop(config: dict[str, Any]) -> None:
    return None


# ---------------------------------------------------------------- measurements


def _startup_distrib(n: int) -> float:
    import distrib.ray

    t0 = time.perf_counter()
    ranks = distrib.ray.run(_trivial_rank, num_workers=n, timeout=300)
    elapsed = time.perf_counter() - t0
    assert ranks == list(range(n)), ranks
    return elapsed


def _startup_torchtrainer(n: int, storage: str, i: int) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        scaling_config=ScalingConfig(num_workers=n, use_gpu=False),
        run_config=RunConfig(storage_path=storage, name=f"bench-{i}"),
    )
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


def _allreduce_ray(n: int, sizes: list[int]) -> list[tuple[int, float]]:
    import distrib.ray

    res = distrib.ray.run(
        _allreduce_rank, num_workers=n, placement="STRICT_PACK", args=(sizes,), timeout=600
    )
    return [tuple(x) for x in res[0]]  # type: ignore[misc]


def _allreduce_distrib_run(n: int, sizes: list[int], tmp: str) -> list[tuple[int, float]]:
    script = os.path.join(tmp, "allreduce_rank.py")
    out = os.path.join(tmp, "out.json")
    with open(script, "w") as f:
        f.write(_DISTRIB_RUN_RANK)
    cmd = [sys.executable, "-m", "launcher", "--nproc", str(n), script]
    cmd += [",".join(map(str, sizes)), out]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    if r.returncode != 0:
        raise SystemExit(f"distrib-run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(out) as f:
        return [tuple(x) for x in json.load(f)]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=4, help="start-up workers (default 4)")
    p.add_argument(
        "--allreduce-nproc",
        type=int,
        default=None,
        help="all-reduce ranks (default: one per usable core, at most --nproc)",
    )
    p.add_argument(
        "--repeat", type=int, default=9, help="all-reduce runs per side, interleaved (default 9)"
    )
    p.add_argument("--startup-repeat", type=int, default=5, help="start-up runs (default 5)")
    p.add_argument("--sizes", default="64K,1M,16M,64M", help="all-reduce sizes in bytes")
    p.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="Ray logical CPUs (default: the larger rank count + 1)",
    )
    p.add_argument("--no-torchtrainer", action="store_true", help="skip Ray Train's start-up")
    args = p.parse_args(argv)
    if args.allreduce_nproc is None:
        args.allreduce_nproc = max(2, min(args.nproc, machine().usable_cores))
    if min(args.nproc, args.repeat, args.startup_repeat) < 1:
        p.error("--nproc, --repeat and --startup-repeat must be >= 1")
    if args.allreduce_nproc < 2:
        p.error("--allreduce-nproc must be >= 2 (an all-reduce of one rank moves nothing)")
    sizes = [_parse_size(s) for s in args.sizes.split(",") if s.strip()]
    import ray

    ray.init(
        address="local",  # a new private instance, never someone else's
        num_cpus=args.cpus or max(args.nproc, args.allreduce_nproc) + 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        print(_machine())
        n = args.nproc
        # ---- start-up
        ours = [_startup_distrib(n) for _ in range(args.startup_repeat)]
        theirs: list[float] = []
        why = ""
        if not args.no_torchtrainer:
            try:
                with tempfile.TemporaryDirectory(prefix="bench-ray-train-") as storage:
                    theirs = [
                        _startup_torchtrainer(n, storage, i) for i in range(args.startup_repeat)
                    ]
            except ImportError as exc:
                why = f"Ray Train not installed ({exc})"
        print(f"\nstart-up to results, {n} workers, seconds (lower is better)")
        print("| launcher | median s | best s | runs |")
        print("|---|---|---|---|")
        print(
            f"| distrib.ray.run (init_process_group + barrier) | "
            f"{statistics.median(ours):.2f} | {min(ours):.2f} | {len(ours)} |"
        )
        if theirs:
            print(
                f"| Ray Train TorchTrainer.fit (gloo group, empty loop) | "
                f"{statistics.median(theirs):.2f} | {min(theirs):.2f} | {len(theirs)} |"
            )
            ratio = statistics.median(theirs) / statistics.median(ours)
            print(f"TorchTrainer / distrib.ray.run (median): {ratio:.2f}x (target >= 1)")
        else:
            print(f"TorchTrainer not measured: {why or '--no-torchtrainer'}")
        # ---- all-reduce
        n = args.allreduce_nproc
        best: dict[str, dict[int, float]] = {"ray": {}, "run": {}}
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            for _ in range(args.repeat):
                for name, res in (
                    ("ray", _allreduce_ray(n, sizes)),
                    ("run", _allreduce_distrib_run(n, sizes, tmp)),
                ):
                    for size, sec in res:
                        best[name][size] = min(best[name].get(size, float("inf")), sec)
        factor = 2.0 * (n - 1) / n
        print(
            f"\nall_reduce float32, {n} ranks on one node, best of {args.repeat} interleaved runs"
        )
        print(
            "| size | distrib-run us | busbw GB/s | distrib.ray us | busbw GB/s | ray/run busbw |"
        )
        print("|---|---|---|---|---|---|")
        worst = float("inf")
        for size in sizes:
            tr, ty = best["run"][size], best["ray"][size]
            bw_r, bw_y = size / tr * factor / 1e9, size / ty * factor / 1e9
            worst = min(worst, bw_y / bw_r)
            print(
                f"| {_fmt_size(size)} | {tr * 1e6:.1f} | {bw_r:.3f} | {ty * 1e6:.1f} | "
                f"{bw_y:.3f} | {bw_y / bw_r:.2f} |"
            )
        print(f"lowest ray/run busbw ratio: {worst:.2f} (target >= 0.90)")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
