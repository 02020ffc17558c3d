"""The failure report printed when a job fails: other failures first, root cause last.

The root cause goes last so that ``tail`` of a long log still shows it. Each entry
names rank, local rank, node, host, pid, exit code or signal name, time, and the
worker's Python traceback (from its error file) or, lacking one, its last output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ._hang import Hang, hang_lines, stack_lines
from ._worker import WorkerExit, signal_name

__all__ = ["format_report", "root_cause"]

_RULE = "=" * 72


def root_cause(exits: Sequence[WorkerExit]) -> WorkerExit | None:
    """The earliest real failure (a worker the launcher did not stop itself)."""
    failed = [e for e in exits if e.failed]
    if not failed:
        return None
    return min(failed, key=lambda e: (e.time, e.node_rank, e.rank))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d} UTC"


def _entry(e: WorkerExit, title: str) -> list[str]:
    lines = [
        f"{title}: rank {e.rank} (local rank {e.local_rank}, node {e.node_rank}) "
        f"on host {e.host}, pid {e.pid}",
        f"  {e.reason()} at {_when(e.time)}"
        + (" (could not start; not retried)" if e.phase == "startup" else ""),
    ]
    if e.traceback.strip():
        lines.append("  traceback:")
        lines += ["    " + ln for ln in e.traceback.rstrip().splitlines()]
    else:
        if e.lost:
            why = "the process was lost with its supervisor; its exit status is unknown"
        elif e.exitcode < 0:
            why = f"the process was killed by {signal_name(-e.exitcode)}"
        else:
            why = "no Python exception was recorded (sys.exit / os._exit / a crash in C code)"
        lines.append(f"  no traceback: {why}")
        if e.last_output:
            lines.append(f"  last output line: {e.last_output}")
    return lines


def format_report(
    exits: Sequence[WorkerExit],
    *,
    run_id: str,
    attempt: int,
    max_restarts: int,
    headline: str,
    hang: Hang | None = None,
    title: str = "distrib-run",
    root: WorkerExit | None = None,
) -> str:
    """Render the report for one failed attempt; ``headline`` says why the job ended.

    With ``hang`` (ranks that never entered a collective), those ranks are the root
    cause and the earliest failure (a rank that timed out waiting) is listed as
    another failure; every rank's stacks are shown. ``root`` overrides the root
    cause (default: the earliest failure).
    """
    if root is None and hang is None:
        root = root_cause(exits)
    others = [e for e in exits if e.failed and e is not root]
    stopped = sorted(e.rank for e in exits if e.stopped_by_launcher)
    out = [
        _RULE,
        f"{title}: job {run_id} FAILED: {headline}",
        f"  attempt {attempt + 1} (restarts used {attempt} of {max_restarts})",
    ]
    for e in sorted(others, key=lambda x: (x.time, x.rank)):
        out.append("-" * 72)
        out += _entry(e, "other failure")
    if stopped:
        out.append("-" * 72)
        out.append(f"stopped by the launcher: ranks {', '.join(map(str, stopped))}")
    out.append("-" * 72)
    if hang is not None:
        out += hang_lines(hang, exits)
        out.append("-" * 72)
        out.append(f"ROOT CAUSE (hang): {hang.headline()}")
        for e in sorted(exits, key=lambda x: x.rank):
            if e.rank in hang.laggards:
                out.append(
                    f"  rank {e.rank} (local rank {e.local_rank}, node {e.node_rank}) on host "
                    f"{e.host}, pid {e.pid}: {hang.states.get(e.rank, '')}"
                )
                out += stack_lines(e, "  ") or ["  (no stack dump: it did not answer)"]
    elif root is not None:
        out += _entry(root, "ROOT CAUSE (first failure)")
    else:
        out.append("no worker failed by itself (see the headline)")
    out.append(_RULE)
    return "\n".join(out) + "\n"
