"""``TorchWork``: the torch ``Work`` a "distrib" backend call returns.

torch's stock wrapper around a future (``_create_work_from_future``) cannot
carry a failure: its ``wait()`` returns True whatever happened, a finite
timeout is refused, and a Python future's ``set_exception`` is, to torch's
C++ side, a successful future whose value is the exception. So a failed
receive or asynchronous collective looked like success. This Work's
``wait()`` raises the operation's error (a ``DistError`` naming rank, call
and peer) or a ``DistTimeoutError`` when its own ``timeout`` runs out, and
its future fails in torch's C++ too, so DistributedDataParallel's backward
raises instead of training on stale gradients.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as _tdist

from .._errors import DistTimeoutError, DistUsageError
from .._validate import WAIT, check_timeout

# torch's stubs do not describe the Python Work API this module uses.
tdist: Any = _tdist

__all__ = ["TorchWork"]


@dataclass(frozen=True)
class _Outcome:
    """What an operation ended with: its outputs, or the error it raised."""

    outputs: list[Any]
    error: BaseException | None


def _unwrap(source: torch.futures.Future) -> Any:
    """``then`` callback: the outputs, or raise, which marks the chained future as
    failed in torch's C++ (the only way Python can)."""
    outcome = source.value()
    if outcome.error is not None:
        raise outcome.error
    return outcome.outputs


def _wait_seconds(timeout: Any, op: str) -> float | None:
    """``Work.wait``'s timeout in seconds; None for torch's "no timeout" (0, absent or
    infinite: until the call ends, which its own group timeout bounds)."""
    if timeout is None or timeout == math.inf:
        return None
    return check_timeout(timeout, f"{op}: Work.wait timeout", DistUsageError, WAIT) or None


# The completion of every call that finished before its Work was made (synchronous
# calls): set once, never cleared, shared (an Event of its own costs more than the
# rest of such a Work).
_FINISHED = threading.Event()
_FINISHED.set()


class TorchWork(tdist.Work):  # type: ignore[misc]
    """Completion of one backend call: ``wait`` raises its error, the future carries it."""

    def __init__(
        self,
        op: str,
        rank: int,
        outputs: list[Any],
        source_rank: int | None = None,
        finished: bool = False,
    ) -> None:
        super().__init__()
        self._op = op
        self._rank = rank
        self._outputs = outputs
        self._source_rank = source_rank
        # finished: the call already succeeded (settle() would have nothing to do)
        self._done = _FINISHED if finished else threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        # Made on the first get_future() (DDP asks for every bucket; a plain call
        # never does, and two torch futures cost more than the rest of this Work).
        self._source: torch.futures.Future | None = None
        self._future: torch.futures.Future | None = None

    def __repr__(self) -> str:
        state = "pending" if not self._done.is_set() else "failed" if self._error else "completed"
        return f"<TorchWork {self._op} {state}>"

    def settle(self, error: BaseException | None) -> None:
        """Finish with ``error`` (None: success); later calls are ignored."""
        with self._lock:
            if self._done.is_set():
                return
            self._error = error
            source = self._source
            self._done.set()
        if source is not None:  # outside the lock: it runs the future's callbacks
            source.set_result(_Outcome(self._outputs, error))

    # -- torch's Work API -------------------------------------------------------
    def wait(self, timeout: Any = None) -> bool:
        """Block until the call finished and re-raise its error; ``timeout`` (a
        timedelta or seconds; 0 or none: until the call's own group timeout) bounds
        this wait only, as gloo's does."""
        seconds = _wait_seconds(timeout, self._op)
        start = time.monotonic()
        if not self._done.wait(seconds):
            raise DistTimeoutError(
                f"rank {self._rank}: Work.wait: {self._op} did not complete within "
                f"{time.monotonic() - start:.1f} s (the operation itself is still bounded "
                "by the group timeout)",
                rank=self._rank,
                op=self._op,
            )
        if self._error is not None:
            raise self._error
        return True

    def get_future(self) -> torch.futures.Future:
        """Resolves to the output tensors, or fails with the call's error."""
        with self._lock:
            if self._future is None:
                self._source = torch.futures.Future()
                self._future = self._source.then(_unwrap)
                settled = self._done.is_set()
            else:
                return self._future
        if settled:  # finished before anyone asked: resolve it now
            self._source.set_result(_Outcome(self._outputs, self._error))
        return self._future

    def is_completed(self) -> bool:
        return self._done.is_set()

    def is_success(self) -> bool:
        return self._done.is_set() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> list[Any]:
        self.wait()
        return self._outputs

    def source_rank(self) -> int:
        if self._source_rank is None:
            raise DistUsageError(
                f"{self._op}: source_rank() is only defined for a receive",
                rank=self._rank,
                op=self._op,
            )
        return self._source_rank

    def synchronize(self) -> None:
        """CPU work: nothing to order on a device stream."""
