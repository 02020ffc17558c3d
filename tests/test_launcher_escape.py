"""Nothing outlives distrib-run: descendants that left the worker's session or group too.

Each worker starts a ``setsid`` child and a double-forked daemon (which ends up
re-parented away from the worker, in its own session), then the launcher is
stopped in each way a user or a scheduler would: SIGTERM, SIGINT, SIGKILL, a
worker failure and a clean exit. Every process the test made must be gone.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from test_launcher_helpers import LauncherHarness

pytestmark = pytest.mark.timeout(90)

# Rank R starts a setsid child and a double-forked daemon, writes all pids, then ENDS.
ESCAPER = """
    import os, subprocess, sys, time
    rank = os.environ["RANK"]
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    child = subprocess.Popen(sleeper, start_new_session=True)
    r, w = os.pipe()
    first = os.fork()
    if first == 0:  # the classic daemon: fork, setsid, fork again, parent exits
        os.setsid()
        second = os.fork()
        if second == 0:
            os.close(r)
            os.write(w, f"{os.getpid()}\\n".encode())
            os.close(w)
            os.closerange(3, 256)
            os.execv(sys.executable, sleeper)
        os._exit(0)
    os.close(w)
    daemon = int(os.read(r, 64).decode())
    os.waitpid(first, 0)
    with open(f"pids.{rank}.tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid} {daemon}\\n")
    os.rename(f"pids.{rank}.tmp", f"pids.{rank}")
    ENDS
"""

ENDINGS = {
    "wait": "time.sleep(120)",
    "fail": ("if rank == '1':\n        time.sleep(0.5)\n        sys.exit(3)\n    time.sleep(120)"),
    "success": "sys.exit(0)",
}


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    yield h
    h.cleanup()


def _live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _escapers(launch, ranks=(0, 1)) -> list[int]:
    pids = [int(x) for r in ranks for x in launch.wait_for_file(f"pids.{r}").split()]
    return pids


def _check_escaped_left_session(pids: list[int]) -> None:
    # the setsid child and the daemon really left the worker's session
    sessions = {os.getsid(p) for p in pids if _live(p)}
    assert len(sessions) >= 3, sessions


@pytest.mark.parametrize(
    "how", ["SIGTERM", "SIGINT", "SIGKILL", "worker_failure", "success"], ids=str
)
def test_nothing_escapes_the_launcher(launch, how):
    ending = {"worker_failure": "fail", "success": "success"}.get(how, "wait")
    script = launch.script("escape.py", ESCAPER.replace("ENDS", ENDINGS[ending]))
    p = launch.popen("--nproc", "2", "--grace-period", "2", script)
    pids = _escapers(launch)
    if how.startswith("SIG"):
        _check_escaped_left_session(pids)
        p.send_signal(getattr(signal, how))
    _out, err = p.communicate(timeout=60)
    expected = {"SIGTERM": 128 + 15, "SIGINT": 128 + 2, "SIGKILL": -9, "worker_failure": 1}
    assert p.returncode == expected.get(how, 0), err
    end = time.monotonic() + 15
    while any(_live(pid) for pid in pids) and time.monotonic() < end:
        time.sleep(0.05)
    survivors = [pid for pid in pids if _live(pid)]
    assert survivors == [], (survivors, err)
    assert launch.leftovers(wait_s=5) == []  # nothing else the test made (guardian included)
