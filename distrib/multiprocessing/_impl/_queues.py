"""Queues whose items are pickled with ``ArrayPickler`` (numpy arrays as shared memory).

``Queue`` and ``JoinableQueue`` pickle where the standard library does: in the
feeder thread, so ``put`` never blocks on pickling and an unpicklable item is
reported by ``_on_queue_feeder_error`` in that thread, as with the stdlib.
The stdlib's feeder pickles with its own ``ForkingPickler``; ``put`` hands it a
``_Deferred`` whose ``__reduce__`` runs ``ArrayPickler`` and leaves the bytes
in the queue's ``_Outbox``; our ``_send_bytes`` then sends those bytes in place
of the feeder's tiny placeholder pickle. The receiver gets one ordinary pickle
stream, made once: no double pickling, no extra copy.

``SimpleQueue`` pickles in ``put`` (the stdlib's does too).
"""

from __future__ import annotations

import multiprocessing.queues as _mpqueues
from collections.abc import Callable
from typing import Any

from ...shm import _client
from ._connection import adopt
from ._pickler import ArrayPickler, dumps

__all__ = ["JoinableQueue", "Queue", "SimpleQueue"]


class _Outbox:
    """The ArrayPickler bytes of the item the feeder thread is pickling right now."""

    __slots__ = ("payload",)

    def __init__(self) -> None:
        self.payload: memoryview | None = None


def _sent_separately() -> None:
    # Never called: the placeholder pickle that carries it is not sent.
    raise RuntimeError("distrib.multiprocessing: a queue placeholder was unpickled")


class _Deferred:
    """An item in a queue's buffer; pickling it runs ArrayPickler on the item."""

    __slots__ = ("obj", "outbox")

    def __init__(self, obj: Any, outbox: _Outbox) -> None:
        self.obj = obj
        self.outbox = outbox

    def __reduce__(self) -> tuple:
        self.outbox.payload = ArrayPickler.dumps(self.obj)
        return _sent_separately, ()


class _FeedsArrays:
    """What Queue and JoinableQueue add to the stdlib's: the feeder sends ArrayPickler bytes."""

    _outbox: _Outbox

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` in the queue; it is pickled later, in the feeder thread."""
        super().put(_Deferred(obj, self._outbox), block, timeout)  # type: ignore[misc]

    def _reset(self, *args: Any, **kwargs: Any) -> None:
        super()._reset(*args, **kwargs)  # type: ignore[misc]
        outbox = self._outbox = _Outbox()
        send: Callable[[Any], None] = self._send_bytes  # type: ignore[has-type]

        def send_bytes(data: Any) -> None:
            payload, outbox.payload = outbox.payload, None
            send(data if payload is None else payload)

        self._send_bytes = send_bytes
        # A feeder error is reported with the user's item, not our wrapper.
        report: Any = type(self)._on_queue_feeder_error  # type: ignore[misc,has-type]

        def on_error(e: BaseException, obj: Any) -> None:
            outbox.payload = None
            report(e, obj.obj if isinstance(obj, _Deferred) else obj)

        self._on_queue_feeder_error = on_error

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return super().get(block, timeout)  # type: ignore[misc]
        finally:
            _client.flush()


class Queue(_FeedsArrays, _mpqueues.Queue):
    """``multiprocessing.Queue`` that shares numpy arrays."""


class JoinableQueue(_FeedsArrays, _mpqueues.JoinableQueue):
    """``multiprocessing.JoinableQueue`` that shares numpy arrays."""


class SimpleQueue(_mpqueues.SimpleQueue):
    """``multiprocessing.SimpleQueue`` that shares numpy arrays (Pool uses it too)."""

    def __init__(self, *, ctx: Any) -> None:
        super().__init__(ctx=ctx)
        # Pool sends tasks through ``_writer.send`` directly: make it ours.
        adopt(self._reader)  # type: ignore[attr-defined]
        adopt(self._writer)  # type: ignore[attr-defined]

    def get(self) -> Any:
        try:
            return super().get()
        finally:
            _client.flush()

    def put(self, obj: Any) -> None:
        data = dumps(obj)  # serialise before taking the lock, as the stdlib does
        writer = self._writer  # type: ignore[attr-defined]
        if self._wlock is None:  # type: ignore[attr-defined]
            writer.send_bytes(data)
        else:
            with self._wlock:  # type: ignore[attr-defined]
                writer.send_bytes(data)
