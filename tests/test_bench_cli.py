"""distrib-bench: the machine header, buffer rotation (both modes), the %mem column, the peers."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distrib._machine import physical_memory
from distrib.bench import _copyrate
from distrib.bench._rotation import footprint, memory_budget, rotation_count

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB = 1 << 20, 1 << 30


# --- the buffer-count rule ---------------------------------------------------------------


@pytest.mark.parametrize("llc", [2 * MiB, 32 * MiB, 256 * MiB])
@pytest.mark.parametrize("world", [1, 2, 16])
def test_rotation_total_reaches_twice_the_llc_unless_memory_caps_it(llc, world):
    memory = 64 * GiB
    budget = memory_budget(memory, world)
    for set_bytes in [4, 4096, 65536, 1 * MiB, 3 * MiB + 7, 16 * MiB, 256 * MiB, 8 * GiB]:
        k = rotation_count(set_bytes, llc, memory, world)
        assert k >= 1
        if set_bytes * math.ceil(2 * llc / set_bytes) <= budget:
            assert k * set_bytes >= 2 * llc  # enough to leave the cache ...
            assert (k - 1) * set_bytes < 2 * llc  # ... and no more sets than that needs
        else:  # capped: as many as the budget holds, at least one
            assert k == max(1, budget // set_bytes)
            assert k == 1 or k * set_bytes <= budget


def test_rotation_is_capped_by_memory_per_rank():
    # 1 GiB of memory, 4 ranks: 32 MiB each, below 2 x a 64 MiB cache.
    assert rotation_count(1 * MiB, 64 * MiB, GiB, 4) == 32
    assert rotation_count(256 * MiB, 64 * MiB, GiB, 4) == 1  # larger than the budget: one
    assert rotation_count(0, 64 * MiB, GiB, 4) == 1  # barrier: nothing to rotate


def test_footprint_counts_every_array_a_call_touches():
    assert footprint("all_reduce", 4096, 2, "float32") == 4096
    assert footprint("all_gather", 4096, 2, "float32") == 4096 + 2048
    assert footprint("all_to_all", 4096, 2, "float32") == 8192
    assert footprint("barrier", 4096, 2, "float32") == 0


def test_memory_fraction_formula():
    # 2 ranks, 1 MB in 1 ms: 3 x 2 x 1e6 / 1e-3 = 6e9 B/s against 12e9 B/s -> one half.
    assert _copyrate.memory_fraction(10**6, 1e-3, 2, 12e9) == pytest.approx(0.5)


def test_copy_rates_are_measured_beyond_the_cache():
    llc, memory = 2 * MiB, physical_memory()
    rates = _copyrate.measure_copy_rates(llc, memory, 2, seconds=0.1, timeout=60)
    assert rates.nbytes >= 2 * llc
    assert rates.procs == 2
    assert rates.one > 1e8 and rates.concurrent > 1e8  # bytes read + written per second


# --- the command ----------------------------------------------------------------------------


def _bench(*args: str, timeout: float = 180) -> str:
    """Run ``python -m distrib.bench ARGS``; its whole process group dies on a timeout."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distrib.bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"distrib-bench {' '.join(args)} ran past {timeout}s")
    assert proc.returncode == 0, err[-3000:]
    return out


def _rows(out: str) -> list[list[str]]:
    """The data rows of the tables: [size, count, type, redop, bufs, |, ...]."""
    return [line.split() for line in out.splitlines() if re.match(r"\s+\d+[KMG]?\s+\d+\s", line)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rotate", "same"])
def test_command_prints_header_mode_and_memory_fraction(mode):
    out = _bench("--nproc", "2", "--ops", "all_reduce", "--sizes", "4K,64K", "--buffers", mode)
    m = re.search(
        r"# machine: (.+), (\d+) usable cores, L2 (\d+) KiB, last-level cache (\d+) MiB "
        r"\(.*\), ([\d.]+) GiB memory",
        out,
    )
    assert m, out
    assert m.group(1).strip() and int(m.group(2)) == len(os.sched_getaffinity(0))
    assert int(m.group(3)) > 0 and int(m.group(4)) > 0 and float(m.group(5)) > 0
    m = re.search(
        r"# memory copy rate .*: 1 process ([\d.]+) GB/s; 2 processes at once ([\d.]+) GB/s", out
    )
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
    assert re.search(rf"^# buffers: {mode} ", out, re.M), out
    assert re.search(rf"^# all_reduce .*buffers={mode}$", out, re.M), out
    head = next(line for line in out.splitlines() if line.lstrip().startswith("size"))
    assert "bufs" in head and "%mem" in head
    assert "skipped" not in out, out
    rows = _rows(out)
    assert [r[0] for r in rows] == ["4K", "64K"], out
    for r in rows:
        bufs = int(r[4])
        # size count type redop bufs | us algbw busbw %mem
        pct = float(r[9])
        assert 0 < pct < 500, out
        if mode == "same":
            assert bufs == 1
        else:  # 4 KiB and 64 KiB sets: many of them, to leave any real cache
            assert bufs > 1
    if mode == "rotate":
        assert int(rows[0][4]) > int(rows[1][4])


def _peer_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not _peer_available("mpi4py") or shutil.which("mpirun") is None, reason="no mpi4py/mpirun"
)
def test_mpi4py_peer_rotates_buffers_from_the_plan():
    from distrib.bench._peers import run_mpi4py

    plan = [{"op": "all_reduce", "sizes": [4096, 65536], "dtype": "float32", "buffers": [7, 2]}]
    res = run_mpi4py(sys.executable, 2, plan, timeout=120)
    assert [op for op, _ in res] == ["all_reduce"]
    assert [s for s, t in res[0][1]] == [4096, 65536]
    assert all(t > 0 for s, t in res[0][1])


@pytest.mark.slow
@pytest.mark.skipif(not _peer_available("torch"), reason="no torch")
def test_gloo_peer_rotates_buffers_from_the_plan():
    from distrib.bench._peers import run_gloo

    plan = [{"op": "all_gather", "sizes": [4096], "dtype": "float32", "buffers": [5]}]
    res = run_gloo(sys.executable, 2, plan, timeout=120)
    assert res[0][0] == "all_gather" and res[0][1][0][0] == 4096 and res[0][1][0][1] > 0


@pytest.mark.slow
def test_compare_runs_every_column_in_rotate_mode():
    # CI installs torch and Open MPI with mpi4py: all four columns must run.
    out = _bench("--compare", "--nproc", "2", "--ops", "all_reduce", "--sizes", "4K")
    head = next(line for line in out.splitlines() if line.lstrip().startswith("size"))
    for column in ("distrib us", "gloo us", "mpi4py us", "memcpy 1 proc us"):
        assert column in head, out
    assert "skipped" not in out and "n/a" not in out, out
    assert len(_rows(out)) == 1, out
