"""Two versions of distrib side by side in one run: collectives and queue passing.

Checks out ``--before`` (a git ref, default ``main``) into a temporary
worktree, then alternates between it and this tree (``--after``, default the
working tree) for ``--rounds`` rounds, each round running in both:

- ``distrib-bench --compare --nproc 2`` (float32 all_reduce, the default
  sizes; the distrib column is compared, the peers are printed for context);
- ``benchmarks/bench_passing.py`` (columns (a)-(c), distrib and the stdlib).

Prints, per size, the median of each version, the run-to-run spread of each
(max - min over its rounds) and after/before, and flags a size where the
new version is slower by more than the larger spread.

    python benchmarks/compare_trees.py [--before main] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\s*(\d+[KMG]?)\s+\d+\s+\w+\s+\w+\s+\|\s+([\d.]+)")
PASS_ROW = re.compile(r"^\s*(\d+ [KMG]iB)\s+\|\s+([\d.]+)\s+\|\s+([\d.]+)\s+\|\s+([\d.]+)")


def _bench_module(tree: Path) -> str:
    if (tree / "distrib" / "bench" / "__main__.py").exists():
        return "distrib.bench"
    return "distrib.comm._bench"  # the layout before distrib.bench existed


def _run(tree: Path, argv: list[str], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    out = subprocess.run(
        argv, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed in {tree}:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def collectives(tree: Path, repeat: int) -> tuple[dict[str, float], str]:
    text = _run(
        tree,
        [sys.executable, "-m", _bench_module(tree), "--compare", "--nproc", "2",
         "--repeat", str(repeat)],
        1800,
    )  # fmt: skip
    rows = {m.group(1): float(m.group(2)) for line in text.splitlines() if (m := ROW.match(line))}
    return rows, text


def passing(tree: Path) -> dict[str, float]:
    text = _run(tree, [sys.executable, "benchmarks/bench_passing.py"], 1800)
    rows: dict[str, float] = {}
    for line in text.splitlines():
        m = PASS_ROW.match(line)
        if m:
            for col, value in zip("abc", m.groups()[1:], strict=True):
                rows[f"{m.group(1)} ({col})"] = float(value)
    return rows


def _table(title: str, unit: str, before: list[dict[str, float]], after: list[dict[str, float]]):
    print(f"\n{title} ({unit}, median of {len(before)} rounds; spread = max - min)")
    print(
        f"{'size':>14} | {'before':>10} {'spread':>8} | {'after':>10} {'spread':>8} | after/before"
    )
    slower = []
    for key in before[0]:
        b = [r[key] for r in before if key in r]
        a = [r[key] for r in after if key in r]
        if not a:
            continue
        mb, ma = statistics.median(b), statistics.median(a)
        sb, sa = max(b) - min(b), max(a) - min(a)
        flag = ""
        if ma - mb > max(sb, sa):
            flag = "  slower beyond the spread"
            slower.append(key)
        print(f"{key:>14} | {mb:10.3f} {sb:8.3f} | {ma:10.3f} {sa:8.3f} | {ma / mb:6.2f}{flag}")
    return slower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git ref of the old version")
    parser.add_argument("--after", default=str(HERE), help="tree of the new version")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="distrib-bench --repeat")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distrib-before-"))
    before_tree = tmp / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(before_tree), args.before],
        cwd=HERE, check=True, capture_output=True,
    )  # fmt: skip
    after_tree = Path(args.after).resolve()
    try:
        print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip
        print(f"# before: {args.before}   after: {after_tree}")
        coll: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        pas: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for rnd in range(args.rounds):
            order = [("before", before_tree), ("after", after_tree)]
            if rnd % 2:
                order.reverse()  # neither version always runs first
            for name, tree in order:
                rows, text = collectives(tree, args.repeat)
                coll[name].append(rows)
                if rnd == 0:
                    print(f"\n## distrib-bench --compare --nproc 2 ({name}, round 1)\n{text}")
                pas[name].append(passing(tree))
        slow = _table("all_reduce float32, 2 ranks, distrib", "us", coll["before"], coll["after"])
        slow += _table("queue round trip", "ms", pas["before"], pas["after"])
        print("\nno size slower beyond the spread" if not slow else f"\nslower: {slow}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=HERE,
                       capture_output=True)  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
