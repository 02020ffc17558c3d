"""benchmarks/bench_ray.py runs end to end on a private Ray instance: the start-up row
for --nproc workers and the all-reduce table at one rank per usable core."""

from __future__ import annotations

import importlib.util
import re

import pytest
from _util import run_benchmark

from distrib._machine import machine

# Only look for Ray: importing it here, before tests/test_ray.py sets the environment
# Ray reads at import, would make that module's cluster resolve 127.0.0.1 elsewhere.
if importlib.util.find_spec("ray") is None:
    pytest.skip("CI installs ray (pip install '.[ray]')", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _run(*args: str) -> str:
    out = run_benchmark("bench_ray.py", *args, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_ray_reports_start_up_and_all_reduce_at_one_rank_per_core():
    common = ["--repeat", "1", "--startup-repeat", "1", "--no-torchtrainer"]
    out = _run("--nproc", "3", "--sizes", "64K,1M", *common)
    assert re.search(r"start-up to results, 3 workers", out), out
    assert re.search(r"\| distrib\.ray\.run .* \| [\d.]+ \| [\d.]+ \| 1 \|", out), out
    ranks = max(2, min(3, machine().usable_cores))
    assert f"all_reduce float32, {ranks} ranks on one node" in out, out
    rows = re.findall(
        r"^\| (64K|1M) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M
    )
    assert [r[0] for r in rows] == ["64K", "1M"], out
    for row in rows:
        assert all(float(x) > 0 for x in row[1:]), row
    assert re.search(r"lowest ray/run busbw ratio: [\d.]+", out), out


def test_bench_ray_rejects_an_all_reduce_of_one_rank():
    out = run_benchmark("bench_ray.py", "--allreduce-nproc", "1", timeout=60)
    assert out.returncode == 2
    assert "--allreduce-nproc must be >= 2" in out.stderr
