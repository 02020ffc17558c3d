"""Bad input to distrib-run and the API is named; a hang names the rank that never arrived.

Fault tables (each row an id): every numeric flag and DISTRIB_* variable against
NaN, infinities, negatives and absurd values; timeout= arguments of the public
API; an unwritable --log-dir; a user's launcher/ or distrib/ folder; world-size
mismatches and duplicate ranks; a rank that sleeps before a collective.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys

import pytest
from _ranks import rank_values
from _util import free_port
from test_launcher_helpers import LauncherHarness

from distrib.testing import run_local_ranks

pytestmark = pytest.mark.timeout(120)

BAD_NUMBERS = {"nan": "nan", "inf": "inf", "neg_inf": "-inf", "huge": "1e999", "negative": "-1"}
# flag -> an absurd (finite, positive) value for it
FLAGS = {
    "--grace-period": "7200",  # > an hour
    "--timeout": "4e7",  # > a year
    "--monitor-interval": "3600",  # > a minute
    "--node-timeout": "4e7",
    "--join-timeout": "4e7",
}
INT_FLAGS = {"--max-restarts": "100000", "--nproc": "100000", "--nnodes": "100000"}


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    yield h
    h.cleanup()


def _rows():
    for flag, absurd in FLAGS.items():
        for name, value in {**BAD_NUMBERS, "absurd": absurd, "zero": "0"}.items():
            yield pytest.param(flag, value, id=f"{flag}={name}")
    for flag, absurd in INT_FLAGS.items():
        for name, value in {"negative": "-1", "absurd": absurd, "nan": "nan"}.items():
            yield pytest.param(flag, value, id=f"{flag}={name}")


@pytest.mark.parametrize(("flag", "value"), list(_rows()))
def test_bad_numeric_flag_exits_2_naming_it(launch, flag, value):
    r = launch.run(f"{flag}={value}", "x.py", timeout=30)
    assert r.returncode == 2, r.stderr
    assert flag in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "value",
    [*BAD_NUMBERS.values(), "0", "4e7", "abc"],
    ids=[*BAD_NUMBERS, "zero", "absurd", "text"],
)
def test_bad_distrib_timeout_is_named(launch, value):
    launch.env["DISTRIB_TIMEOUT"] = value
    r = launch.run("x.py", timeout=30)
    assert r.returncode == 2 and "DISTRIB_TIMEOUT" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    from distrib import DistUsageError
    from distrib._config import config

    with pytest.raises(DistUsageError, match="DISTRIB_TIMEOUT"):
        config({"DISTRIB_TIMEOUT": value})


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("DISTRIB_RESTART_COUNT", "-1"),
        ("DISTRIB_MAX_RESTARTS", "100000"),
        ("DISTRIB_INLINE_THRESHOLD", "-5"),
        ("DISTRIB_LAUNCHER_PID", "0"),
        ("DISTRIB_DUMP_FD", "-1"),
    ],
    ids=lambda v: str(v),
)
def test_bad_numeric_variable_is_named(var, value):
    from distrib import DistUsageError
    from distrib._config import config

    with pytest.raises(DistUsageError, match=var):
        config({var: value})


TIMEOUTS = {
    "nan": float("nan"),
    "inf": float("inf"),
    "neg_inf": float("-inf"),
    "negative": -1.0,
    "zero": 0,
    "over_a_year": 4e7,
    "timedelta_over_a_year": datetime.timedelta(days=400),
}


@pytest.mark.parametrize("value", list(TIMEOUTS.values()), ids=list(TIMEOUTS))
def test_bad_timeout_arguments_raise_a_named_error(tmp_path, value):
    import distrib
    from distrib import DistUsageError
    from distrib.comm._work import Work

    with pytest.raises(DistUsageError, match="timeout"):
        distrib.init_process_group(
            init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=value
        )
    assert not distrib.is_initialized()
    store = distrib.FileStore(str(tmp_path / "fs"), 1)
    with pytest.raises(DistUsageError, match="timeout"):
        store.set_timeout(value)
    with pytest.raises(DistUsageError, match="timeout"):
        store.wait(["k"], value)
    with pytest.raises(ValueError, match="timeout"):
        distrib.FileStore(str(tmp_path / "fs2"), 1, timeout=value)
    if value == 0:  # Work.wait(0) polls, as threading's waits do
        with pytest.raises(distrib.DistTimeoutError, match="did not complete"):
            Work("all_reduce", 0).wait(value)
    else:
        with pytest.raises(DistUsageError, match=r"Work\.wait timeout"):
            Work("all_reduce", 0).wait(value)


def test_timeout_subgroup_and_tcp_store(tmp_path):
    import distrib

    distrib.init_process_group(init_method=f"file://{tmp_path / 's'}", rank=0, world_size=1)
    try:
        with pytest.raises(distrib.DistUsageError, match="timeout"):
            distrib.new_group([0], timeout=float("nan"))
        with pytest.raises(distrib.DistUsageError, match="timeout"):
            distrib.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=float("inf"))
    finally:
        distrib.destroy_process_group()


@pytest.mark.parametrize("how", ["under_a_file", "in_proc"], ids=str)
def test_unwritable_log_dir_is_a_flag_error(launch, how):
    blocker = launch.dir / "a_file"
    blocker.write_text("")
    path = str(blocker / "logs") if how == "under_a_file" else "/proc/distrib-logs"
    script = launch.script("ok.py", "print('hi')\n")
    r = launch.run("--log-dir", path, script, timeout=30)
    assert r.returncode == 2, r.stderr
    assert f"--log-dir {path!r}" in r.stderr and "Traceback" not in r.stderr
    assert re.search(r"not a writable directory: \S", r.stderr)


@pytest.mark.parametrize("folder", ["launcher", "distrib"], ids=str)
@pytest.mark.parametrize("kind", ["package", "namespace"], ids=str)
def test_user_folder_in_cwd_cannot_shadow_ours(launch, folder, kind):
    # The script lives elsewhere, so `python train.py` ignores the working directory.
    (launch.dir / folder).mkdir()
    if kind == "package":
        (launch.dir / folder / "__init__.py").write_text("raise SystemExit('shadowed!')\n")
    scripts = launch.dir / "scripts"
    scripts.mkdir()
    script = scripts / "train.py"
    script.write_text(
        "import sys, distrib\nprint('OK', hasattr(distrib, 'init_process_group'), sys.path[0])\n"
    )
    # The launcher itself runs from the repository (-P: not from the shadowing folder).
    cmd = [sys.executable, "-P", "-m", "launcher", "--nproc", "2", str(script)]
    r = subprocess.run(
        cmd, cwd=launch.dir, env=launch.env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [f"[{k}]: OK True {scripts}" for k in (0, 1)]


def _join_world(rank, n, timeout_s):
    import distrib as dist

    try:
        dist.init_process_group(timeout=float(timeout_s))
        return "JOINED"
    except Exception as exc:
        return f"ERROR {type(exc).__name__} {exc}"


def _run_ranks(specs, timeout_s="5"):
    """One process per (RANK, WORLD_SIZE) spec, each joining through env:// itself."""
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    envs = [dict(base, RANK=str(rank), WORLD_SIZE=str(size)) for rank, size in specs]
    results = run_local_ranks(
        _join_world, len(specs), timeout_s, init_group=False, env=envs, timeout=60
    )
    return rank_values(results)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([(0, 2), (1, 3)], "WORLD_SIZE is 3 on rank 1 but 2 on rank 0"),
        ([(0, 3), (1, 2)], "WORLD_SIZE is 2 on rank 1 but 3 on rank 0"),
        ([(0, 3), (1, 3), (2, 4)], "WORLD_SIZE is 4 on rank 2 but 3 on rank 0"),
        ([(0, 3), (1, 3), (1, 3)], "rank 1 joined twice"),
        ([(0, 3), (1, 3)], "rank 2 never joined"),
    ],
    ids=["size_2_vs_3", "size_3_vs_2", "third_rank_differs", "duplicate_rank", "missing_rank"],
)
def test_world_misconfiguration_is_named_on_every_rank(launch, specs, message):
    outs = _run_ranks(specs, timeout_s="3")
    for out in outs:
        assert "ERROR" in out and message in out, outs


HANG = """
    import os, sys, time
    import numpy as np
    import distrib as dist
    rank = int(os.environ["RANK"])
    dist.init_process_group(timeout=float(sys.argv[1]))
    x = np.ones(1024, np.float32)
    for _ in range(3):
        dist.all_reduce(x)
    if rank == LAGGARD:
        time.sleep(100)  # the hang: this rank never reaches the next collective
    dist.all_reduce(x)
"""


@pytest.mark.parametrize(
    ("nproc", "laggard", "transport", "flags", "group_timeout"),
    [
        (3, 1, "shm", [], "3"),
        (2, 0, "shm", [], "3"),
        (3, 2, "zmq", [], "3"),
        (3, 1, "shm", ["--timeout", "4"], "600"),
    ],
    ids=["shm_collective_timeout", "shm_rank0_hangs", "zmq_collective_timeout", "launcher_timeout"],
)
def test_hang_report_names_the_rank_that_never_entered(
    launch, nproc, laggard, transport, flags, group_timeout
):
    launch.env["DISTRIB_TRANSPORT"] = transport
    script = launch.script("hang.py", HANG.replace("LAGGARD", str(laggard)))
    r = launch.run("--nproc", str(nproc), "--grace-period", "2", *flags, script, group_timeout)
    assert r.returncode == 1, r.stderr
    report = r.stderr[r.stderr.index("=" * 72) :]
    root = report[report.index("ROOT CAUSE") :]
    assert f"ROOT CAUSE (hang): rank {laggard} never entered collective #3 all_reduce" in root
    assert f"stacks of rank {laggard}" in root and "time.sleep(100)" in root
    assert "<- NEVER ENTERED" in report
    for rank in range(nproc):  # every rank's stacks (or, for one that failed, its dump)
        assert f"stacks of rank {rank}" in report, report
    for rank in set(range(nproc)) - {laggard}:
        assert re.search(rf"rank {rank}: last entered #3 all_reduce.*<- waiting", report)
