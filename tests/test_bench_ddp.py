"""benchmarks/bench_ddp.py runs end to end: every column, at 1 and 2 ranks, with torch."""

from __future__ import annotations

import re

import pytest
from _util import run_benchmark

pytestmark = pytest.mark.timeout(300)


def test_bench_ddp_reports_every_column_and_the_ceiling():
    args = ["--ranks", "1", "2", "--steps", "1", "--warmup", "1", "--repeat", "1"]
    out = run_benchmark("bench_ddp.py", *args, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    head = next(line for line in out.stdout.splitlines() if line.startswith("ranks"))
    for column in ("distrib samp/s", "torch/gloo", "torch/distrib", "torch/nocomm", "comm cpu"):
        assert column in head, head
    rows = [line for line in out.stdout.splitlines() if re.match(r"\s+[12] \|", line)]
    assert len(rows) == 2, out.stdout
    for row in rows:  # 1 + 4 column groups, each with a positive samples/s
        groups = row.split("|")
        assert len(groups) == 5, row
        assert all(float(g.split()[0]) > 0 for g in groups[1:]), row
    ratio = re.search(
        r"torch DDP at 2 ranks: over distrib / over gloo = ([\d.]+)x samples/s "
        r"\(no all-reduce at all / over gloo = ([\d.]+)x\)",
        out.stdout,
    )
    assert ratio is not None, out.stdout
    assert float(ratio.group(1)) > 0 and float(ratio.group(2)) > 0


def test_bench_ddp_bucket_view_reaches_torch_ddp():
    args = ["--ranks", "1", "--steps", "1", "--warmup", "1", "--repeat", "1", "--bucket-view"]
    out = run_benchmark("bench_ddp.py", *args, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch gradient_as_bucket_view=True" in out.stdout, out.stdout
