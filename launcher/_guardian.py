"""The guardian: a forked helper that stops every worker if the launcher is killed.

Workers ask the kernel for SIGTERM when the launcher dies (``PR_SET_PDEATHSIG``),
but that reaches only the worker itself, not processes the worker started. The
guardian closes that gap. Protocol over a pipe from the launcher (the only
writer): ``+PGID\\n`` a worker process group to watch, ``-PGID\\n`` one that is
fully gone, ``exit\\n`` a clean shutdown. End of file without ``exit`` means the
launcher died (even by SIGKILL: the kernel closes its pipe end): the guardian
sends SIGTERM to every watched group, waits a grace period, sends SIGKILL, exits.
It runs in its own session, so signals aimed at the launcher's group miss it.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

from ._procs import group_has_live_member

__all__ = ["Guardian"]


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
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # Only the pipe matters; stdin/stdout would keep a caller's pipe open.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    groups: set[int] = set()
    buf = b""
    while True:
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
    if not groups:
        return
    sys.stderr.write(
        f"distrib-run guardian: the launcher died; stopping {len(groups)} worker group(s)\n"
    )
    sys.stderr.flush()
    _signal_all(groups, signal.SIGTERM)
    end = time.monotonic() + grace_period
    while groups and time.monotonic() < end:
        time.sleep(0.05)
        groups = {g for g in groups if group_has_live_member(g)}
    _signal_all(groups, signal.SIGKILL)


def _signal_all(groups: set[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
