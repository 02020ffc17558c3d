"""``Work``: the handle an ``async_op=True`` operation returns (torch's ``Work``).

One type for every completion: a queued CPU operation (``Work``, finished by
the group's progress thread), one that needs nothing (``Work.completed``) and
GPU work enqueued on a CUDA stream (``CudaEventWork``, finished by the device).
``wait()`` returns True or raises: a timeout is ``DistTimeoutError``, never False.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .._errors import DistTimeoutError, DistUsageError
from .._validate import WAIT, check_timeout
from ..gpu._driver import import_cupy

__all__ = ["CudaEventWork", "Work"]


class Work:
    """Completion handle of one operation queued on a group's progress thread."""

    def __init__(self, op: str, rank: int | None = None) -> None:
        self.op = op
        self._rank = rank
        self._done = threading.Event()
        self._exc: BaseException | None = None
        self._result: list[Any] = []
        self._callbacks: list[Callable[[Work], None]] | None = []
        self._callbacks_lock = threading.Lock()

    @classmethod
    def completed(cls, op: str, result: list[Any] | None = None) -> Work:
        """A handle that is already finished (nothing to communicate, e.g. one rank)."""
        work = cls(op)
        work._finish(None, result)
        return work

    def __repr__(self) -> str:
        state = "failed" if self._exc else "completed" if self._done.is_set() else "pending"
        return f"<Work {self.op} {state}>"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the operation finished; re-raise its error. ``timeout`` in seconds
        bounds this wait only (the operation keeps its own group timeout)."""
        if timeout is not None:  # threading's wait overflows on inf, misbehaves on NaN
            timeout = check_timeout(timeout, f"{self.op}: Work.wait timeout", DistUsageError, WAIT)
        start = time.monotonic()
        if not self._done.wait(timeout):
            raise DistTimeoutError(
                f"Work.wait: {self.op} did not complete within {time.monotonic() - start:.1f} s "
                "(the operation itself is still bounded by the group timeout)",
                rank=self._rank,
                op=self.op,
            )
        if self._exc is not None:
            raise self._exc
        return True

    def is_completed(self) -> bool:
        """True once the operation finished, successfully or not."""
        return self._done.is_set()

    def is_success(self) -> bool:
        """True once the operation finished without error."""
        return self._done.is_set() and self._exc is None

    def exception(self) -> BaseException | None:
        """The error the operation raised, or ``None`` (also while it is pending)."""
        return self._exc

    def result(self) -> list[Any]:
        """The arrays the operation wrote (after ``wait``)."""
        self.wait()
        return self._result

    def add_done_callback(self, fn: Callable[[Work], None]) -> None:
        """Call ``fn(work)`` once the operation finished (now, if it already has), on the
        thread that finished it; how the torch backend completes torch futures."""
        with self._callbacks_lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, exc: BaseException | None = None, result: list[Any] | None = None) -> None:
        self._exc = exc
        if result is not None:
            self._result = result
        self._done.set()
        with self._callbacks_lock:
            callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            fn(self)


class CudaEventWork(Work):
    """Completion of GPU work enqueued by a collective, backed by one CUDA event.

    ``wait()`` follows torch: it makes the caller's *current stream* wait for
    the collective (no host block) and returns True; ``synchronize()`` blocks
    the host until the work finished, bounded by ``timeout``.
    """

    def __init__(
        self, stream: Any, opname: str, rank: int, timeout: float, result: Any = None
    ) -> None:
        super().__init__(opname, rank)
        cupy = import_cupy(opname)
        self._cupy = cupy
        self.event = cupy.cuda.Event(block=False, disable_timing=True)
        # None: the caller's current stream, where the collective was just enqueued.
        self.event.record(cupy.cuda.get_current_stream() if stream is None else stream)
        self.opname = opname
        self.rank = rank
        self.timeout = timeout
        self._result = result

    def is_completed(self) -> bool:
        return bool(self.event.done)

    def wait(self, timeout: float | None = None) -> bool:
        self._cupy.cuda.get_current_stream().wait_event(self.event)
        return True

    def synchronize(self, timeout: float | None = None) -> None:
        limit = self.timeout if timeout is None else check_timeout(timeout, "synchronize timeout")
        deadline = time.monotonic() + limit
        while not self.event.done:
            if time.monotonic() > deadline:
                raise DistTimeoutError(
                    f"rank {self.rank}: GPU {self.opname} did not finish within {limit:.1f}s",
                    rank=self.rank,
                    op=self.opname,
                )
            time.sleep(0.0002)

    def result(self) -> Any:
        return self._result

    def add_done_callback(self, fn: Callable[[Work], None]) -> None:
        """Call ``fn(work)`` once the device finished (this blocks the host until then)."""
        self.synchronize()
        fn(self)

    def exception(self) -> BaseException | None:
        """Always ``None``: a failed enqueue raises at the call, a failed kernel at the
        next call (the watchdog aborts the communicator)."""
        return None

    def is_success(self) -> bool:
        return self.is_completed()
