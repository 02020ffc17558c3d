"""Process-group plumbing on Linux: live members, orphan reaping, subreaper mode.

A worker runs as the leader of its own process group. When it exits, processes it
started stay in that group; with the launcher marked a *child subreaper* they are
re-parented to the launcher (not to PID 1, which may never reap them), so the
launcher can stop and reap them and no zombie lingers.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = [
    "descendants",
    "group_has_live_member",
    "is_live",
    "pids_with_environ",
    "reap_group",
    "set_child_subreaper",
    "signal_pids",
]

_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def set_child_subreaper() -> bool:
    """Adopt orphaned descendants (Linux >= 3.4); ``False`` where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_group(pgid: int) -> None:
    """Reap every exited child of ours in process group ``pgid`` (never blocks).

    Call only after the group leader's ``Popen`` has reaped the leader itself.
    """
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def group_has_live_member(pgid: int) -> bool:
    """Whether a process other than a zombie is in group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no /proc: trust kill(0)
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after "pid (comm) ": state ppid pgrp ...; comm may contain spaces
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _stat(pid: int) -> tuple[bytes, int, int] | None:
    """(state, ppid, start time in clock ticks) of ``pid``, or ``None`` if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return fields[0], int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's), from ``/proc/PID/task/*/children``."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return _children_by_scan(pid)  # no CONFIG_PROC_CHILDREN: scan the table
    return out


def _children_by_scan(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] == pid:
                out.append(int(entry))
    return out


def descendants(root: int, exclude: frozenset[int] = frozenset()) -> dict[int, tuple[bytes, int]]:
    """Every descendant of ``root``: pid -> (state, start time); ``exclude``'s subtrees skipped.

    Zombies are included (state ``Z``) so that a parent can reap them.
    """
    found: dict[int, tuple[bytes, int]] = {}
    todo = [root]
    while todo:
        for child in _children(todo.pop()):
            if child in exclude or child in found:
                continue
            st = _stat(child)
            if st is None:
                continue
            found[child] = (st[0], st[2])
            todo.append(child)
    return found


def is_live(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if given, started at ``start_time``."""
    st = _stat(pid)
    if st is None or st[0] in (b"Z", b"X"):
        return False
    return start_time is None or st[2] == start_time


def pids_with_environ(entry: bytes) -> list[int]:
    """Live processes whose initial environment holds ``entry`` (``b"NAME=value"``)."""
    me, out = os.getpid(), []
    needle = entry + b"\0"
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if b"\0" + needle in env + b"\0" and is_live(int(name)):
            out.append(int(name))
    return out


def signal_pids(pids: object, sig: int) -> None:
    """Send ``sig`` to each pid, ignoring those already gone."""
    for pid in pids:  # type: ignore[attr-defined]
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
