"""Shared harness for the launcher tests (no tests here): run distrib-run, find leftovers.

Every process a test starts carries ``LAUNCHER_TEST_MARK=<uuid>`` in its
environment (inherited by workers and their children), so leftovers are found in
the process table even after they were re-parented away from the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from _hygiene import private_shm_dir

REPO = Path(__file__).resolve().parent.parent


def _shm_entries() -> set[str]:
    """Entries in this run's private DISTRIB_SHM_DIR (tests/_hygiene.py): all ours."""
    try:
        return set(os.listdir(private_shm_dir()))
    except FileNotFoundError:
        return set()


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``marker``."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("LAUNCHER_TEST_MARK") == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


class LauncherHarness:
    """Run ``python -m launcher`` in a temp dir; assert nothing is left behind."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.marker = uuid.uuid4().hex
        self.env = dict(os.environ)
        self.env["LAUNCHER_TEST_MARK"] = self.marker
        self.env.pop("OMP_NUM_THREADS", None)
        for key in list(self.env):
            if key.startswith("DISTRIB_") and key != "DISTRIB_SHM_DIR":
                del self.env[key]
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self._shm_before = _shm_entries()
        self._popens: list[subprocess.Popen[str]] = []

    def script(self, name: str, body: str) -> str:
        """Write a worker script into the temp dir; return its path."""
        path = self.dir / name
        path.write_text(textwrap.dedent(body))
        return str(path)

    def cmd(self, *args: str, python: str | None = None) -> list[str]:
        return [python or sys.executable, "-m", "launcher", *args]

    def run(
        self, *args: str, timeout: float = 60, python: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the launcher to completion; stdout/stderr captured as text."""
        return subprocess.run(
            self.cmd(*args, python=python),
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start the launcher in the background (stopped by ``cleanup`` if still running)."""
        p = subprocess.Popen(
            self.cmd(*args),
            cwd=self.dir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._popens.append(p)
        return p

    def finish_all(
        self, procs: list[subprocess.Popen[str]], timeout: float = 60
    ) -> list[tuple[int, str, str]]:
        """(exit code, stdout, stderr) of each process, read concurrently.

        Reading one launcher's pipes while another's fill up would block that one
        in its console write, which also stops its heartbeats.
        """
        results: list[tuple[int, str, str] | None] = [None] * len(procs)

        def collect(i: int) -> None:
            out, err = procs[i].communicate(timeout=timeout)
            results[i] = (procs[i].returncode, out, err)

        threads = [threading.Thread(target=collect, args=(i,)) for i in range(len(procs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        assert all(r is not None for r in results), "a launcher did not finish in time"
        return results  # type: ignore[return-value]

    def wait_for_file(self, name: str, timeout: float = 60) -> str:
        """Wait (bounded) until a worker created ``name`` in the temp dir; return its text."""
        path = self.dir / name
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if path.exists():
                text = path.read_text()
                if text.endswith("\n"):
                    return text
            time.sleep(0.02)
        raise AssertionError(f"no {name} after {timeout} s")

    def leftovers(self, wait_s: float = 10) -> list[psutil.Process]:
        end = time.monotonic() + wait_s
        procs = marked_processes(self.marker)
        while procs and time.monotonic() < end:
            time.sleep(0.05)
            procs = marked_processes(self.marker)
        return procs

    def cleanup(self) -> None:
        """Fail the test if any marked process or new named segment survived it."""
        for p in self._popens:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)
        stray = self.leftovers()
        desc = [f"pid {p.pid}: {' '.join(p.cmdline())[:150]}" for p in stray]
        for p in stray:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        leaked = _shm_entries() - self._shm_before
        end = time.monotonic() + 5.0
        while leaked and time.monotonic() < end:
            # the cleanup daemon unlinks a dead process's named segments within moments
            time.sleep(0.25)
            leaked &= _shm_entries()
        if desc:
            pytest.fail("processes left behind:\n" + "\n".join(desc))
        if leaked:
            pytest.fail(f"named segments left behind in DISTRIB_SHM_DIR: {sorted(leaked)}")
