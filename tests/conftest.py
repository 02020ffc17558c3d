"""Suite-wide hygiene: after the whole run, no new /dev/shm entry and no stray process.

Each test also gets a faulthandler dump on a hang (pytest-timeout) and a per-test
check that it left no child process behind (long-lived helpers of the standard
library, such as the forkserver and resource tracker, are allowed).
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

_SHM = "/dev/shm"
# Helper processes that legitimately outlive one test (started once per session).
_ALLOWED = ("forkserver", "resource_tracker", "distrib.shm._cleanup", "semaphore_tracker")
# Processes of a fixture that outlives one test (a module's Ray cluster): the fixture
# adds their pids through ``long_lived_pids`` and removes them when it ends; they and
# their descendants (Ray's pooled workers) are not strays of the tests in between.
_LONG_LIVED: set[int] = set()


def _own_driver_file(name: str) -> bool:
    # The CUDA driver's IPC file of this (still running) pytest process,
    # /dev/shm/cuda.shm.<n>.<pid hex>.<n>; distrib.shm removes it at exit.
    parts = name.split(".")
    return len(parts) == 5 and name.startswith("cuda.shm.") and parts[3] == f"{os.getpid():x}"


def _shm_entries() -> set[str]:
    try:
        names = os.listdir(_SHM)
    except FileNotFoundError:
        return set()
    return {n for n in names if not n.startswith("sem.") and not _own_driver_file(n)}


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


_start_shm: set[str] = set()


@pytest.fixture(scope="session")
def long_lived_pids() -> set[int]:
    """Register pids of processes that a module-scoped fixture keeps across tests."""
    return _LONG_LIVED


def pytest_sessionstart(session: pytest.Session) -> None:
    _start_shm.update(_shm_entries())


@pytest.fixture(autouse=True)
def _no_stray_children():
    yield
    stray = _wait_gone(10.0)
    if stray:
        desc = [f"pid {p.pid}: {' '.join(p.cmdline())[:200]}" for p in stray]
        for p in stray:
            try:
                p.kill()
            except psutil.Error:
                pass
        pytest.fail("test left child processes running:\n" + "\n".join(desc))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Cleanup helpers (the file_system strategy's daemon) get a moment to unlink.
    end = time.monotonic() + 10.0
    leaked = _shm_entries() - _start_shm
    while leaked and time.monotonic() < end:
        time.sleep(0.1)
        leaked = _shm_entries() - _start_shm
    problems = []
    if leaked:
        problems.append("new /dev/shm entries after the suite: " + ", ".join(sorted(leaked)))
        for name in leaked:  # leave the machine clean even when failing
            try:
                os.unlink(os.path.join(_SHM, name))
            except OSError:
                pass
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
