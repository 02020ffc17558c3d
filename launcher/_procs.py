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

__all__ = ["group_has_live_member", "reap_group", "set_child_subreaper"]

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
