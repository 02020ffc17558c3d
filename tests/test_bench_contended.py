"""benchmarks/bench_contended.py runs end to end: every column, with torch and Open MPI."""

from __future__ import annotations

import re

import pytest
from _util import run_benchmark

pytestmark = pytest.mark.timeout(300)


def test_bench_contended_reports_every_column():
    args = ["--sizes-mib", "0.25", "1", "--calls", "2", "--repeat", "1"]
    out = run_benchmark("bench_contended.py", *args, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "left out" not in out.stdout, out.stdout  # CI has torch, mpi4py and mpirun
    head = next(line for line in out.stdout.splitlines() if line.startswith("     size"))
    for column in ("distrib", "kernel slice", "torch gloo", "Open MPI", "no compute"):
        assert column in head, head
    rows = [line for line in out.stdout.splitlines() if re.match(r"\s+[\d.]+ MiB \|", line)]
    assert len(rows) == 2, out.stdout
    for row in rows:
        cells = [float(c) for c in row.split("|")[1:]]
        assert len(cells) == 5 and all(c > 0 for c in cells), row
    assert "Linux" in out.stdout  # the kernel decides what a slice request does
