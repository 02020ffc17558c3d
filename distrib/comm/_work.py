"""``Work``: the handle an ``async_op=True`` collective returns (torch's ``Work``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .._errors import DistTimeoutError, DistUsageError
from .._validate import WAIT, check_timeout

__all__ = ["Work"]


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
