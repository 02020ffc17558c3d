"""The guardian: a forked helper that stops every worker if the launcher is killed.

Workers ask the kernel for SIGTERM when the launcher dies (``PR_SET_PDEATHSIG``),
but that reaches only the worker itself, not processes the worker started, and
``killpg`` misses those that left the worker's process group or session
(``setsid``, double-forked daemons). The guardian closes that gap: while workers
run it records the launcher's whole process tree every ``_SCAN_S``, and when the
launcher dies it stops every recorded process still running, every process whose
environment carries this launcher's ``DISTRIB_LAUNCHER_PID`` (newer than the last
scan), and all their descendants. Protocol over a pipe from the launcher (the only
writer): ``+PGID\\n`` a worker process group to watch, ``-PGID\\n`` one that is
fully gone, ``exit\\n`` a clean shutdown. End of file without ``exit`` means the
launcher died (even by SIGKILL: the kernel closes its pipe end): the guardian
sends SIGTERM to every watched group, waits a grace period, sends SIGKILL, exits.
It runs in its own session, so signals aimed at the launcher's group miss it.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time

from ._procs import descendants, group_has_live_member, is_live, pids_with_environ, signal_pids

__all__ = ["Guardian"]

# How often the guardian records the launcher's process tree while workers run, so
# that processes which left their session and lost their parent are still known
# when the launcher dies (those newer than one scan are found by their environment).
_SCAN_S = 0.25
# After SIGKILL, how long to keep killing newcomers (a process forking as it dies).
_KILL_S = 5.0


class Guardian:
    """Fork the guardian now (before any thread starts); feed it worker groups."""

    def __init__(self, grace_period: float, scratch_dir: str | None = None) -> None:
        read_fd, self._write_fd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the guardian; never returns
            try:
                os.close(self._write_fd)
                _guard(read_fd, grace_period)
                if scratch_dir is not None:  # the launcher could not clean up after itself
                    shutil.rmtree(scratch_dir, ignore_errors=True)
            finally:
                os._exit(0)
        os.close(read_fd)
        self._closed = False

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        """Tell the guardian all is well and reap it (bounded)."""
        if self._closed:
            return
        self._send("exit\n")
        self._closed = True
        os.close(self._write_fd)
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            time.sleep(0.005)

    def _send(self, line: str) -> None:
        if self._closed:
            return
        try:
            os.write(self._write_fd, line.encode())
        except OSError:
            pass  # the guardian is gone; nothing better to do


def _guard(read_fd: int, grace_period: float) -> None:
    launcher = os.getppid()
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # Only the pipe matters; stdin/stdout would keep a caller's pipe open.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    groups: set[int] = set()
    known: dict[int, int] = {}  # every process seen in the launcher's tree -> start time
    me = frozenset({os.getpid()})
    buf = b""
    while True:
        ready, _, _ = select.select([read_fd], [], [], _SCAN_S)
        if ready:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line == b"exit":
                    os._exit(0)  # a clean shutdown: the launcher cleaned up itself
                if line[:1] == b"+":
                    groups.add(int(line[1:]))
                elif line[:1] == b"-":
                    groups.discard(int(line[1:]))
        if groups:  # workers run: remember the tree, escaped daemons included
            known = {p: t for p, t in known.items() if is_live(p, t)}
            for pid, (state, started) in descendants(launcher, exclude=me).items():
                if state != b"Z":
                    known[pid] = started
    marker = f"DISTRIB_LAUNCHER_PID={launcher}".encode()
    if not groups and not known and not pids_with_environ(marker):
        return
    sys.stderr.write(
        "distrib-run guardian: the launcher died; stopping its workers and every process "
        "they started\n"
    )
    sys.stderr.flush()
    _stop_tree(groups, known, marker, grace_period)


def _targets(groups: set[int], known: dict[int, int], marker: bytes) -> set[int]:
    """Live processes of the dead launcher's job: known ones, marked ones, their trees."""
    roots = {p for p, t in known.items() if is_live(p, t)} | set(pids_with_environ(marker))
    found = set(roots)
    for pid in roots:
        found |= {p for p, (state, _) in descendants(pid).items() if state != b"Z"}
    found.discard(os.getpid())
    return found


def _stop_tree(groups: set[int], known: dict[int, int], marker: bytes, grace: float) -> None:
    """SIGTERM the whole tree, wait ``grace`` (signalling newcomers), then SIGKILL until empty."""
    _signal_all(groups, signal.SIGTERM)
    signalled = _targets(groups, known, marker)
    signal_pids(signalled, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        time.sleep(0.05)
        groups = {g for g in groups if group_has_live_member(g)}
        now = _targets(groups, known, marker)
        signal_pids(now - signalled, signal.SIGTERM)
        signalled |= now
        if not now and not groups:
            return
    end = time.monotonic() + _KILL_S
    while time.monotonic() < end:
        _signal_all(groups, signal.SIGKILL)
        now = _targets(groups, known, marker)
        signal_pids(now, signal.SIGKILL)
        groups = {g for g in groups if group_has_live_member(g)}
        if not now and not groups:
            return
        time.sleep(0.05)


def _signal_all(groups: set[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
