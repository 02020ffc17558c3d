"""The suite's hygiene: the shared memory and processes it made itself, and only those.

A pytest plugin (``tests/conftest.py`` imports its hooks; ``-p _hygiene`` loads it
alone). Other programs share this machine's ``/dev/shm``: the suite never judges,
let alone deletes, an entry it did not make.

- ``DISTRIB_SHM_DIR`` points at a private directory for the run (inside
  ``/dev/shm``, so named segments stay in tmpfs): whatever is left there at the
  end is ours, reported and removed, and the directory with it.
- The CUDA driver's files ``/dev/shm/cuda.shm.<n>.<pid hex>.<n>`` are judged by
  their pid: a watcher (on machines with an NVIDIA driver) looks at new ones
  while the run lasts and keeps those whose process belongs to the suite's tree (a descendant of this process, or
  one carrying this run's ``PYTEST_DISTRIB_RUN`` id in its environment).
  Such a file still there after its process ended is a leak.
- Tests that use the default ``/dev/shm`` location check the names they made.
- Every test: no child process left running; the run: no descendant left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid

import psutil
import pytest

SHM = "/dev/shm"
RUN_MARK = "PYTEST_DISTRIB_RUN"  # in the environment of every process the run starts
# Helper processes that legitimately outlive one test (started once per session).
_ALLOWED = ("forkserver", "resource_tracker", "distrib.shm._cleanup", "semaphore_tracker")
_WATCH_S = 0.25


class _State:
    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.private: str | None = None
        self.seen: set[str] = set()  # cuda.shm.* names looked at (present at start, or new)
        self.ours: dict[str, int] = {}  # our processes' driver files -> pid
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


_state = _State()


def private_shm_dir() -> str:
    """This run's directory for named segments (``DISTRIB_SHM_DIR``)."""
    assert _state.private is not None, "the _hygiene plugin is not configured"
    return _state.private


def _driver_pid(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) != 5 or not name.startswith("cuda.shm."):
        return None
    try:
        return int(parts[3], 16)
    except ValueError:
        return None


def _in_our_tree(pid: int) -> bool:
    me = os.getpid()
    if pid == me:
        return True
    try:
        proc = psutil.Process(pid)
        if any(p.pid == me for p in proc.parents()):
            return True
        return proc.environ().get(RUN_MARK) == _state.run_id
    except psutil.Error:
        return False  # gone before we could tell, or another user's: not ours to judge


def scan() -> None:
    """Look at new CUDA driver files now (the watcher does this every 0.25 s); a file
    whose process is already gone when first seen is left alone (not known to be ours)."""
    try:
        names = [n for n in os.listdir(SHM) if n.startswith("cuda.shm.")]
    except OSError:
        return
    with _state.lock:
        for name in names:
            if name in _state.seen:
                continue
            _state.seen.add(name)
            pid = _driver_pid(name)
            if pid is not None and _in_our_tree(pid):
                _state.ours[name] = pid


def _watch() -> None:
    while not _state.stop.wait(_WATCH_S):
        scan()


def pytest_configure(config: pytest.Config) -> None:
    _state.private = tempfile.mkdtemp(prefix=f"distrib-tests-{os.getpid()}-", dir=SHM)
    os.environ["DISTRIB_SHM_DIR"] = _state.private
    os.environ[RUN_MARK] = _state.run_id
    try:  # files already there belong to whoever made them before us
        _state.seen.update(n for n in os.listdir(SHM) if n.startswith("cuda.shm."))
    except OSError:
        pass
    # Only the CUDA driver makes these files: no watcher thread (and no thread to fork
    # with) on machines without an NVIDIA driver; scan() still runs at the end.
    if os.path.exists("/dev/nvidiactl"):
        _state.thread = threading.Thread(target=_watch, name="shm-hygiene", daemon=True)
        _state.thread.start()


# Processes of a fixture that outlives one test (a module's Ray cluster): the fixture
# adds their pids through ``long_lived_pids`` and removes them when it ends; they and
# their descendants (Ray's pooled workers) are not strays of the tests in between.
_LONG_LIVED: set[int] = set()


@pytest.fixture(scope="session")
def long_lived_pids() -> set[int]:
    """Register pids of processes that a module-scoped fixture keeps across tests."""
    return _LONG_LIVED


def _stray_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if _LONG_LIVED and {p.pid for p in (child, *child.parents())} & _LONG_LIVED:
                continue
        except psutil.Error:
            continue
        if not any(a in cmd for a in _ALLOWED):
            out.append(child)
    return out


def _wait_gone(deadline_s: float) -> list[psutil.Process]:
    end = time.monotonic() + deadline_s
    stray = _stray_children()
    while stray and time.monotonic() < end:
        time.sleep(0.05)
        stray = _stray_children()
    return stray


@pytest.fixture(autouse=True)
def _no_stray_children():
    yield
    scan()  # driver files of this test's processes, while some may still be alive
    stray = _wait_gone(10.0)
    if stray:
        desc = [f"pid {p.pid}: {' '.join(p.cmdline())[:200]}" for p in stray]
        for p in stray:
            try:
                p.kill()
            except psutil.Error:
                pass
        pytest.fail("test left child processes running:\n" + "\n".join(desc))


def _leaked_driver_files() -> list[str]:
    """Our processes' driver files still present although their process ended."""
    scan()
    with _state.lock:
        ours = dict(_state.ours)
    return sorted(
        name
        for name, pid in ours.items()
        if pid != os.getpid() and os.path.exists(os.path.join(SHM, name)) and not _alive(pid)
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def _private_entries() -> list[str]:
    try:
        return sorted(os.listdir(private_shm_dir()))
    except OSError:
        return []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _state.stop.set()
    # The cleanup daemon (file_system strategy) gets a moment to unlink.
    end = time.monotonic() + 10.0
    leaked = _private_entries()
    while leaked and time.monotonic() < end:
        time.sleep(0.1)
        leaked = _private_entries()
    problems = []
    if leaked:
        problems.append(
            f"entries left in this run's DISTRIB_SHM_DIR ({private_shm_dir()}): "
            + ", ".join(leaked)
        )
    drivers = _leaked_driver_files()
    if drivers:
        problems.append(
            "CUDA driver files of ended processes of this run in /dev/shm: " + ", ".join(drivers)
        )
        for name in drivers:  # ours: leave the machine clean even when failing
            _remove(os.path.join(SHM, name))
    shutil.rmtree(private_shm_dir(), ignore_errors=True)
    stray = _wait_gone(5.0)
    if stray:
        problems.append(
            "processes left running after the suite: "
            + ", ".join(f"{p.pid} ({' '.join(p.cmdline())[:120]})" for p in stray)
        )
        for p in stray:
            try:
                p.kill()
            except psutil.Error:
                pass
    if problems:
        print("\nHYGIENE FAILURE:\n  " + "\n  ".join(problems))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
