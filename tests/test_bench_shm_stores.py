"""benchmarks/bench_shm_stores.py runs end to end: three settings per size, both paths."""

from __future__ import annotations

import re

import pytest
from _util import run_benchmark

from distrib.transport.shm._native import load

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(load() is None, reason="no C compiler: no streaming stores"),
]


def test_bench_shm_stores_prints_every_setting_for_every_size():
    # 1 MiB takes the C step, 64 MiB the single-copy path (_NATIVE_MAX is half the cache)
    out = run_benchmark("bench_shm_stores.py", "--sizes", "1M,64M", "--rounds", "2", timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "# machine:" in out.stdout
    head = next(line for line in out.stdout.splitlines() if line.lstrip().startswith("size"))
    for column in ("cached", "streaming", "chosen", "cached/streaming"):
        assert column in head, head
    rows = {
        m.group(1): line
        for line in out.stdout.splitlines()
        if (m := re.match(r"\s+(\d+)M \|", line))
    }
    assert set(rows) == {"1", "64"}, out.stdout
    for line in rows.values():
        times = [float(t) for t in re.findall(r"(\d+) \(\s*[\d.]+\)", line)]
        assert len(times) == 3 and all(t > 0 for t in times), line
        lo, hi = (float(x) for x in re.findall(r"([\d.]+) \.\. ([\d.]+)", line)[0])
        assert 0 < lo <= hi, line


def test_bench_shm_stores_watch_prints_a_row_per_sample():
    out = run_benchmark("bench_shm_stores.py", "--watch", "2", "--every", "0", timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if re.match(r"\s+\d+ \|", line)]
    assert len(rows) == 2, out.stdout
    for row in rows:
        state, times = row.split("|")[1:]
        assert float(state) > 0, row
        assert len(times.split()) == 3 and all(float(t) > 0 for t in times.split()), row
