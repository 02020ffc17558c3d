"""distrib-run failure paths: reports, stopping the group, signals, orphans, restarts."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
from test_launcher_helpers import LauncherHarness

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    yield h
    h.cleanup()


# Rank 1 fails in the given way once every rank is up; the others wait to be stopped.
FAILING = """
    import os, signal, sys, time
    rank = int(os.environ["RANK"])
    open(f"up.{rank}", "w").close()
    end = time.monotonic() + 20
    while not all(os.path.exists(f"up.{r}") for r in range(int(os.environ["WORLD_SIZE"]))):
        assert time.monotonic() < end
        time.sleep(0.01)
    if rank == 1:
        print("rank 1 about to fail", flush=True)
        HOW
    time.sleep(30)
"""

CASES = {
    "exit_code": ("sys.exit(3)", "exit code 3", None),
    "exception": (
        "def load(path):\n            raise FileNotFoundError('no data at ' + path)\n"
        "        load('/data/x')",
        "exit code 1",
        "FileNotFoundError: no data at /data/x",
    ),
    "sigkill": ("os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL", None),
    "os_exit": ("os._exit(7)", "exit code 7", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_worker_failure_stops_group_and_reports_root_cause_last(launch, case):
    how, reason, exc_line = CASES[case]
    script = launch.script("fail.py", FAILING.replace("HOW", how))
    t0 = time.monotonic()
    r = launch.run("--nproc", "3", "--grace-period", "5", script)
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < 20  # the others were stopped, not waited for
    report = r.stderr[r.stderr.index("=" * 72) :]
    root = report[report.index("ROOT CAUSE") :]
    assert "stopped by the launcher: ranks 0, 2" in report
    assert report.index("stopped by the launcher") < report.index("ROOT CAUSE")
    assert re.search(
        r"ROOT CAUSE \(first failure\): rank 1 \(local rank 1, node 0\) on host \S+, pid \d+", root
    )
    assert reason in root and "UTC" in root
    if exc_line is not None:
        assert "traceback:" in root and exc_line in root and "in load" in root
        assert "_bootstrap" not in root  # our frames are trimmed
    elif case == "sigkill":
        assert "no traceback: the process was killed by SIGKILL" in root
    else:
        assert "last output line: rank 1 about to fail" in root
    assert root.rstrip().endswith("=" * 72)  # the root cause is the last thing printed


def test_record_decorator_keeps_a_caught_exception(launch):
    script = launch.script(
        "rec.py",
        """
        import sys
        import distrib

        @distrib.record
        def main():
            raise KeyError("missing-config-key")

        try:
            main()
        except Exception:
            sys.exit(4)  # the entry point swallows the exception
        """,
    )
    r = launch.run("--nproc", "1", script)
    assert r.returncode == 1
    root = r.stderr[r.stderr.index("ROOT CAUSE") :]
    assert "exit code 4" in root and "KeyError: 'missing-config-key'" in root and "in main" in root


def test_other_failures_are_listed_before_the_root_cause(launch):
    # Rank 1 raises its own exception when the launcher's SIGTERM arrives: a failure of
    # its own (listed), but not the root cause (rank 0 failed first).
    script = launch.script(
        "two.py",
        """
        import os, signal, sys, time
        rank = int(os.environ["RANK"])
        if rank == 1:
            def on_term(*a):
                raise RuntimeError("second, while being stopped")
            signal.signal(signal.SIGTERM, on_term)
            open("ready", "w").close()
            time.sleep(30)
        end = time.monotonic() + 20
        while not os.path.exists("ready"):
            assert time.monotonic() < end
            time.sleep(0.01)
        raise RuntimeError("first")
        """,
    )
    r = launch.run("--nproc", "2", script)
    assert r.returncode == 1
    report = r.stderr[r.stderr.index("=" * 72) :]
    root = report[report.index("ROOT CAUSE") :]
    assert "rank 0" in root and "RuntimeError: first" in root
    other = report[: report.index("ROOT CAUSE")]
    assert "other failure: rank 1" in other and "RuntimeError: second, while being stopped" in other
    assert "second" not in root and "stopped by the launcher" not in report


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_to_launcher_is_forwarded(launch, sig):
    script = launch.script(
        "wait.py",
        """
        import os, signal, sys, time
        rank = os.environ["RANK"]
        def handler(signum, frame):
            print("rank", rank, "got", signal.Signals(signum).name, flush=True)
            sys.exit(0)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, handler)
        open(f"up.{rank}", "w").write("up\\n")
        time.sleep(30)
        """,
    )
    p = launch.popen("--nproc", "2", script)
    launch.wait_for_file("up.0")
    launch.wait_for_file("up.1")
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    name = signal.Signals(sig).name
    assert p.returncode == 128 + sig, err
    assert sorted(out.splitlines()) == [f"[0]: rank 0 got {name}", f"[1]: rank 1 got {name}"]
    assert f"distrib-run received {name}" in err


def _descendant_pids(launch) -> list[int]:
    # Each worker starts a grandchild (in the worker's process group) and reports both pids.
    return [int(x) for r in (0, 1) for x in launch.wait_for_file(f"pids.{r}").split()]


GRANDPARENT = """
    import os, subprocess, sys, time
    rank = os.environ["RANK"]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(f"pids.{rank}.tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}\\n")
    os.rename(f"pids.{rank}.tmp", f"pids.{rank}")
    open(f"errfile.{rank}", "w").write(os.environ["DISTRIB_ERROR_FILE"] + "\\n")
    EXIT
"""


def test_sigkill_of_launcher_leaves_no_orphans(launch):
    script = launch.script("gp.py", GRANDPARENT.replace("EXIT", "time.sleep(60)"))
    p = launch.popen("--nproc", "2", "--grace-period", "2", script)
    pids = _descendant_pids(launch)
    assert all(psutil.pid_exists(pid) for pid in pids)
    scratch = os.path.dirname(os.path.dirname(launch.wait_for_file("errfile.0").strip()))
    assert os.path.isdir(scratch)
    p.kill()  # SIGKILL: no chance to clean up; PDEATHSIG + the guardian must
    p.communicate(timeout=30)
    assert launch.leftovers(wait_s=15) == []  # workers, grandchildren and the guardian
    assert not os.path.exists(scratch)  # the guardian also removed the error-file directory


def test_worker_exiting_leaves_no_grandchild_behind(launch):
    script = launch.script("gp.py", GRANDPARENT.replace("EXIT", "sys.exit(0)"))
    r = launch.run("--nproc", "2", "--grace-period", "2", script)
    assert r.returncode == 0, r.stderr
    assert "exited 0 but left processes; stopping them" in r.stderr
    for pid in _descendant_pids(launch):
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_worker_ignoring_sigterm_is_killed_after_grace_period(launch):
    script = launch.script(
        "stubborn.py",
        """
        import os, signal, sys, time
        rank = int(os.environ["RANK"])
        if rank == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open("ignoring", "w").close()
            time.sleep(60)
        end = time.monotonic() + 20
        while not os.path.exists("ignoring"):
            assert time.monotonic() < end
            time.sleep(0.01)
        sys.exit(2)
        """,
    )
    t0 = time.monotonic()
    r = launch.run("--nproc", "2", "--grace-period", "1", script)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1
    assert "rank 1" in r.stderr[r.stderr.index("ROOT CAUSE") :]
    assert "stopped by the launcher: ranks 0" in r.stderr
    assert 1.0 <= elapsed < 20


@pytest.mark.parametrize(
    ("name", "body", "expect"),
    [
        ("missing.py", None, "No such file or directory: 'missing.py'"),
        ("syntax.py", "def broken(:\n    pass\n", "SyntaxError"),
    ],
)
def test_script_that_cannot_start_is_not_retried(launch, name, body, expect):
    if body is not None:
        launch.script(name, body)
    r = launch.run("--nproc", "2", "--max-restarts", "3", name)
    assert r.returncode == 1
    assert "restarting" not in r.stderr
    assert "before the script started; not retried" in r.stderr
    assert expect in r.stderr[r.stderr.index("ROOT CAUSE") :]


def test_missing_module_and_executable_are_not_retried(launch):
    r = launch.run("--nproc", "1", "--max-restarts", "2", "-m", "no_such_module_xyz")
    assert r.returncode == 1 and "restarting" not in r.stderr
    assert "No module named 'no_such_module_xyz'" in r.stderr
    r = launch.run("--nproc", "1", "--max-restarts", "2", "--no-python", "/no/such/program")
    assert r.returncode == 1 and "restarting" not in r.stderr
    assert "cannot execute '/no/such/program'" in r.stderr


def test_restart_succeeds_on_second_attempt(launch):
    script = launch.script(
        "flaky.py",
        """
        import os, sys
        attempt = int(os.environ["DISTRIB_RESTART_COUNT"])
        print("attempt", attempt, "of max", os.environ["DISTRIB_MAX_RESTARTS"])
        if attempt == 0 and os.environ["RANK"] == "1":
            raise RuntimeError("transient failure")
        """,
    )
    r = launch.run("--nproc", "2", "--max-restarts", "3", script)
    assert r.returncode == 0, r.stderr
    assert "[1]: attempt 1 of max 3" in r.stdout and "[0]: attempt 1 of max 3" in r.stdout
    assert "restarting all workers (restart 1 of 3)" in r.stderr
    assert "attempt 2" not in r.stdout and "FAILED" not in r.stderr


def test_restarts_run_out(launch):
    script = launch.script(
        "always.py",
        "import os\nprint('attempt', os.environ['DISTRIB_RESTART_COUNT'])\nraise SystemExit(5)\n",
    )
    r = launch.run("--nproc", "1", "--max-restarts", "2", script)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["[0]: attempt 0", "[0]: attempt 1", "[0]: attempt 2"]
    assert "attempt 3 (restarts used 2 of 2)" in r.stderr and "exit code 5" in r.stderr


def test_timeout_stops_a_hung_job_with_report(launch):
    script = launch.script("hang.py", "import time\nprint('working', flush=True)\ntime.sleep(60)\n")
    t0 = time.monotonic()
    r = launch.run("--nproc", "2", "--timeout", "1", "--monitor-interval", "0.2", script)
    assert r.returncode == 1
    assert time.monotonic() - t0 < 20
    assert "FAILED: --timeout 1 s passed" in r.stderr
    assert "stopped by the launcher: ranks 0, 1" in r.stderr


def test_launcher_pid_check_and_error_file_api(tmp_path):
    from distrib._record import read_error_file, write_error_file

    path = str(tmp_path / "e.json")
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        assert write_error_file(exc, path=path) == path
        assert write_error_file(RuntimeError("later"), path=path) is None  # first wins
    doc = read_error_file(path)
    assert doc["message"] == "ValueError: bad value" and "raise ValueError" in doc["traceback"]
    assert doc["pid"] == os.getpid() and doc["phase"] == "run"
    torch_style = tmp_path / "t.json"
    torch_style.write_text(
        '{"message": {"message": "RuntimeError: x", "extraInfo": {"py_callstack": "TB", '
        '"timestamp": "12"}}}'
    )
    assert read_error_file(str(torch_style))["traceback"] == "TB"
    assert read_error_file(str(tmp_path / "missing.json")) is None


def test_killed_worker_leaves_no_cuda_driver_file(launch):
    # The CUDA driver's IPC file is removed only by its own exit handler, which a
    # SIGKILL skips: the launcher removes each ended worker's file once it reaped it.
    script = launch.script(
        "driver_file.py",
        """
    import os, signal, time
    rank = int(os.environ["RANK"])
    path = f"/dev/shm/cuda.shm.0.{os.getpid():x}.1"
    open(path, "w").close()
    print("PATH", path, flush=True)
    open(f"up.{rank}", "w").close()
    end = time.monotonic() + 20
    while not all(os.path.exists(f"up.{r}") for r in range(2)):
        assert time.monotonic() < end
        time.sleep(0.01)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # rank 0 is then stopped by the launcher
    time.sleep(30)
""",
    )
    r = launch.run("--nproc", "2", script)
    assert r.returncode == 1, r.stderr
    paths = re.findall(r"PATH (\S+)", r.stdout)
    assert len(paths) == 2, r.stdout
    assert not any(os.path.exists(p) for p in paths)
