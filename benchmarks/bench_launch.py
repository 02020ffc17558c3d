"""Launch overhead: ``distrib-run --nproc N`` vs ``torchrun --nproc-per-node N``.

Wall time from starting the launcher until every worker has run a trivial script
and the launcher has exited, median of several runs. The two launchers alternate
(distrib-run, torchrun, distrib-run, ...) so background load hits both alike.
torchrun runs with ``--standalone`` (a free port, like ours) as
``python -m torch.distributed.run`` from this interpreter when it has torch,
else from ``--peer-python`` ($DISTRIB_PEER_PYTHON by default). The
third row is distrib-run with TorchX's one-node command line
(``--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0``). The table starts with a
line naming the machine (CPU model, core count, load average, Python).

    python benchmarks/bench_launch.py [--nproc 4] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from distrib.bench._cli import default_peer_python

TRIVIAL = "import os\nassert int(os.environ['WORLD_SIZE']) > 0\n"


def _time_once(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, timeout=300, check=False)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}):\n{r.stderr.decode()[-2000:]}")
    return elapsed


def _has_torch(python: str) -> bool:
    probe = [python, "-c", "import torch.distributed.run"]
    return subprocess.run(probe, capture_output=True, timeout=120, check=False).returncode == 0


def machine_line() -> str:
    """CPU model, core count, load average and Python version of this machine."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"machine: {model}, {os.cpu_count()} CPUs, load average {load:.1f}, "
        f"python {sys.version.split()[0]}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4, help="workers per launch (default 4)")
    p.add_argument("--repeat", type=int, default=7, help="runs per launcher (default 7)")
    p.add_argument(
        "--peer-python",
        default=default_peer_python(),
        help="interpreter with torch (default: $DISTRIB_PEER_PYTHON, else this one)",
    )
    args = p.parse_args(argv)
    if args.nproc < 1 or args.repeat < 1:
        p.error("--nproc and --repeat must be >= 1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIB_")}
    env.pop("OMP_NUM_THREADS", None)
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        script = os.path.join(tmp, "trivial.py")
        with open(script, "w") as f:
            f.write(TRIVIAL)
        runs: dict[str, list[float]] = {}
        cmds = {
            "distrib-run": [sys.executable, "-m", "launcher", "--nproc", str(args.nproc), script]
        }
        cmds["distrib-run, TorchX one-node form"] = [sys.executable, "-m", "launcher", "--rdzv-backend", "c10d",
                                    "--rdzv-endpoint", "127.0.0.1:0", "--nproc-per-node",
                                    str(args.nproc), script]  # fmt: skip
        torch_python = sys.executable if _has_torch(sys.executable) else args.peer_python
        if torch_python is not None:
            cmds["torchrun"] = [
                torch_python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(args.nproc),
                script,
            ]
        else:
            print("note: no interpreter with torch found (--peer-python); torchrun row skipped")
        for name, cmd in cmds.items():  # one warm-up each: page cache, .pyc files
            _time_once(cmd, env, tmp)
            runs[name] = []
        for _ in range(args.repeat):
            for name, cmd in cmds.items():
                runs[name].append(_time_once(cmd, env, tmp))
    ours = statistics.median(runs["distrib-run"])
    print(f"\nlaunch + {args.nproc} trivial workers + exit, {args.repeat} runs each")
    print(machine_line() + "\n")
    print("| launcher | median s | min s | max s | vs distrib-run |")
    print("|---|---:|---:|---:|---:|")
    for name, times in runs.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.3f} | {min(times):.3f} | {max(times):.3f} | {med / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
