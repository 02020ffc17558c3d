"""``spawn``: run ``fn(i, *args)`` in ``nprocs`` processes, torch's semantics.

If any process raises, the others are terminated and the parent raises
``ProcessRaisedException`` carrying the child's traceback and index; a process
that exits non-zero or dies by a signal gives ``ProcessExitedException`` with
its exit code and the signal's name.
"""

from __future__ import annotations

import multiprocessing.connection as _mpconn
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from ..._errors import DistError
from ._context import default_context

__all__ = [
    "ProcessContext",
    "ProcessException",
    "ProcessExitedException",
    "ProcessRaisedException",
    "spawn",
]

# Tracebacks larger than this are cut: the child writes into a pipe the parent
# reads only after the child exits, and a Linux pipe buffers 64 KiB.
_MAX_TRACEBACK_CHARS = 32_000
# After the first failure, survivors get this long to exit on SIGTERM before SIGKILL.
_TERMINATE_GRACE_S = 3.0


class ProcessException(DistError):
    """A process started by ``spawn`` failed (``error_index``, ``pid``)."""

    def __init__(self, msg: str, error_index: int, pid: int) -> None:
        super().__init__(msg, rank=error_index, op="spawn", peer=pid)
        self.msg = msg
        self.error_index = error_index
        self.pid = pid

    def __reduce__(self) -> tuple:
        return type(self), (self.msg, self.error_index, self.pid)


class ProcessRaisedException(ProcessException):
    """A spawned process raised; the message holds its traceback."""


class ProcessExitedException(ProcessException):
    """A spawned process exited non-zero or was killed (``exit_code``, ``signal_name``)."""

    def __init__(
        self,
        msg: str,
        error_index: int,
        error_pid: int,
        exit_code: int,
        signal_name: str | None = None,
    ) -> None:
        super().__init__(msg, error_index, error_pid)
        self.exit_code = exit_code
        self.signal_name = signal_name

    def __reduce__(self) -> tuple:
        return type(self), (self.msg, self.error_index, self.pid, self.exit_code, self.signal_name)


def _wrap(fn: Callable[..., Any], i: int, args: tuple, error_queue: Any) -> None:
    try:
        fn(i, *args)
    except KeyboardInterrupt:
        pass  # the parent is tearing everything down
    except BaseException:
        text = traceback.format_exc()
        if len(text) > _MAX_TRACEBACK_CHARS:
            text = "...(truncated)...\n" + text[-_MAX_TRACEBACK_CHARS:]
        error_queue.put(text)
        sys.exit(1)


class ProcessContext:
    """The processes started by ``spawn``; ``join`` waits for them and reports failures."""

    def __init__(self, processes: list, error_queues: list) -> None:
        self.processes = processes
        self.error_queues = error_queues
        self.sentinels = {p.sentinel: i for i, p in enumerate(processes)}

    def pids(self) -> list[int]:
        """The process ids, in index order."""
        return [int(p.pid) for p in self.processes]

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True once all exited cleanly.

        Raises:
            ProcessRaisedException: a process raised (its traceback is in the message).
            ProcessExitedException: a process exited non-zero or died by a signal.
        """
        if not self.sentinels:
            return True
        ready = _mpconn.wait(list(self.sentinels), timeout=timeout)
        failed: int | None = None
        for sentinel in ready:
            index = self.sentinels.pop(sentinel)
            proc = self.processes[index]
            proc.join()
            if proc.exitcode != 0 and failed is None:
                failed = index
        if failed is None:
            return not self.sentinels
        self._terminate_rest()
        proc = self.processes[failed]
        queue = self.error_queues[failed]
        if not queue.empty():
            text = queue.get()
            header = f"\n\n-- Process {failed} (pid {proc.pid}) raised:\n"
            raise ProcessRaisedException(header + text, failed, proc.pid)
        code = proc.exitcode
        if code < 0:
            name = signal.Signals(-code).name
            raise ProcessExitedException(
                f"process {failed} (pid {proc.pid}) was killed by signal {name}",
                failed,
                proc.pid,
                code,
                name,
            )
        raise ProcessExitedException(
            f"process {failed} (pid {proc.pid}) exited with exit code {code}",
            failed,
            proc.pid,
            code,
        )

    def _terminate_rest(self) -> None:
        alive = [p for p in self.processes if p.is_alive()]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + _TERMINATE_GRACE_S
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in alive:
            if p.is_alive():
                p.kill()
                p.join()
        self.sentinels.clear()


def spawn(
    fn: Callable[..., Any],
    args: tuple = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> ProcessContext | None:
    """Start ``nprocs`` processes running ``fn(i, *args)``, torch's ``spawn``.

    Returns None when ``join`` is true (after all processes finished cleanly),
    else the ``ProcessContext`` to ``join`` later.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive int, got {nprocs!r}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple, got {type(args).__name__}")
    ctx = default_context.get_context(start_method)
    error_queues, processes = [], []
    for i in range(nprocs):
        error_queue = ctx.SimpleQueue()
        proc = ctx.Process(target=_wrap, args=(fn, i, args, error_queue), daemon=daemon)
        proc.start()
        error_queues.append(error_queue)
        processes.append(proc)
    context = ProcessContext(processes, error_queues)
    if not join:
        return context
    while not context.join():
        pass
    return None
