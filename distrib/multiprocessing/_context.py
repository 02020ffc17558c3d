"""Start-method contexts whose queues, pipes, processes and pools share arrays.

Each class here subclasses its standard-library counterpart and changes one
thing: objects are pickled with ``ArrayPickler`` (numpy arrays become
shared-memory handles). Nothing in the standard module is patched or
registered: ``multiprocessing.Queue`` keeps copying arrays.

Where the stdlib pickles in a place we cannot reach (a Queue's feeder thread,
a spawned Process's arguments), we hand it a ``Preserialized`` wrapper made by
``ArrayPickler`` up front. A side effect users see: ``Queue.put`` pickles
synchronously, so an array changed after ``put`` is sent as it was at ``put``
(the stdlib and torch pickle later, in the feeder thread).
"""

from __future__ import annotations

import multiprocessing.connection as _mpconn
import multiprocessing.context as _mpctx
import multiprocessing.process as _mpprocess
import multiprocessing.queues as _mpqueues
import os
import sys
from typing import Any

from .._cuda_files import remove_cuda_ipc_files
from ..shm import _client
from ._pickler import ArrayPickler, Preserialized, dumps

__all__ = [
    "Connection",
    "DefaultContext",
    "ForkContext",
    "ForkServerContext",
    "JoinableQueue",
    "Pipe",
    "Process",
    "Queue",
    "SimpleQueue",
    "SpawnContext",
    "default_context",
]


# -- connections ---------------------------------------------------------------
class Connection(_mpconn.Connection):
    """A pipe end whose ``send`` shares numpy arrays instead of copying them."""

    def send(self, obj: Any) -> None:
        """Send ``obj``; numpy arrays travel as shared-memory handles."""
        self._check_closed()  # type: ignore[attr-defined]
        self._check_writable()  # type: ignore[attr-defined]
        self._send_bytes(ArrayPickler.dumps(obj))  # type: ignore[attr-defined]

    def recv(self) -> Any:
        """Receive an object; arrays arrive mapped onto the sender's shared memory."""
        try:
            return super().recv()
        finally:
            _client.flush()

    def __reduce__(self) -> tuple:
        # Passed to a spawned child: rebuild as our class, not the stdlib's.
        _, args = _mpconn.reduce_connection(self)  # type: ignore[attr-defined]
        return _rebuild_connection, args


def _rebuild_connection(dup_fd: Any, readable: bool, writable: bool) -> Connection:
    return Connection(dup_fd.detach(), readable, writable)


def _adopt(conn: _mpconn.Connection) -> Connection:
    conn.__class__ = Connection  # same layout: only the send path changes
    return conn  # type: ignore[return-value]


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
    """A pair of connected ``Connection`` objects (like ``multiprocessing.Pipe``)."""
    a, b = _mpconn.Pipe(duplex)
    return _adopt(a), _adopt(b)


# -- queues --------------------------------------------------------------------
class Queue(_mpqueues.Queue):
    """``multiprocessing.Queue`` that shares numpy arrays."""

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(Preserialized(obj), block, timeout)


class JoinableQueue(_mpqueues.JoinableQueue):
    """``multiprocessing.JoinableQueue`` that shares numpy arrays."""

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(Preserialized(obj), block, timeout)


class SimpleQueue(_mpqueues.SimpleQueue):
    """``multiprocessing.SimpleQueue`` that shares numpy arrays (Pool uses it too)."""

    def __init__(self, *, ctx: Any) -> None:
        super().__init__(ctx=ctx)
        # Pool sends tasks through ``_writer.send`` directly: make it ours.
        _adopt(self._reader)  # type: ignore[attr-defined]
        _adopt(self._writer)  # type: ignore[attr-defined]

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


# -- processes -----------------------------------------------------------------
class _SharedArgs:
    """Pickle a Process's args/kwargs with ArrayPickler (spawn and forkserver only)."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_args"] = Preserialized(state["_args"])
        state["_kwargs"] = Preserialized(state["_kwargs"])
        return state


class _CleansUpAfterChild:
    """Remove what a child that ended without cleaning up leaves in /dev/shm.

    A child that used CUDA IPC gets a file from the CUDA driver that only the
    driver's exit handler removes; ``kill -9`` (or ``os._exit`` from user code)
    skips it. The parent removes the child's files once it sees the child end
    (every path that learns the exit code goes through ``Popen.poll``).
    """

    def start(self) -> None:
        super().start()  # type: ignore[misc]
        popen = self._popen  # type: ignore[attr-defined]
        poll = popen.poll

        def poll_and_clean(flag: int = os.WNOHANG) -> int | None:
            code = poll(flag)
            if code is not None and not getattr(popen, "_distrib_cleaned", False):
                popen._distrib_cleaned = True
                remove_cuda_ipc_files(popen.pid)
            return code

        popen.poll = poll_and_clean


class ForkProcess(_CleansUpAfterChild, _mpctx.ForkProcess):
    """A forked child: arguments are inherited, shared arrays stay shared."""


class SpawnProcess(_CleansUpAfterChild, _SharedArgs, _mpctx.SpawnProcess):
    """A spawned child: array arguments arrive as shared-memory handles."""


class ForkServerProcess(_CleansUpAfterChild, _SharedArgs, _mpctx.ForkServerProcess):
    """A forkserver child: array arguments arrive as shared-memory handles."""


class Process(_CleansUpAfterChild, _SharedArgs, _mpprocess.BaseProcess):
    """``multiprocessing.Process`` using this module's default start method."""

    _start_method = None

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return default_context.get_context().Process._Popen(process_obj)

    @staticmethod
    def _after_fork() -> Any:
        return default_context.get_context().Process._after_fork()


# -- contexts ------------------------------------------------------------------
class _ArrayContext:
    """What our contexts add to the stdlib's: our queues, pipes and contexts."""

    def get_context(self, method: str | None = None) -> Any:
        if method is None:
            return self
        try:
            ctx = _concrete[method]
        except KeyError:
            raise ValueError(f"cannot find context for {method!r}") from None
        ctx._check_available()
        return ctx

    def Queue(self, maxsize: int = 0) -> Queue:
        return Queue(maxsize, ctx=self.get_context())

    def JoinableQueue(self, maxsize: int = 0) -> JoinableQueue:
        return JoinableQueue(maxsize, ctx=self.get_context())

    def SimpleQueue(self) -> SimpleQueue:
        return SimpleQueue(ctx=self.get_context())

    def Pipe(self, duplex: bool = True) -> tuple[Connection, Connection]:
        return Pipe(duplex)


class ForkContext(_ArrayContext, _mpctx.ForkContext):
    Process = ForkProcess


class SpawnContext(_ArrayContext, _mpctx.SpawnContext):
    Process = SpawnProcess


class ForkServerContext(_ArrayContext, _mpctx.ForkServerContext):
    Process = ForkServerProcess


_concrete: dict[str, Any] = {"spawn": SpawnContext()}
if sys.platform != "win32":
    _concrete["fork"] = ForkContext()
    _concrete["forkserver"] = ForkServerContext()


class DefaultContext(_ArrayContext, _mpctx.DefaultContext):
    """The module-level context; its start method is separate from the stdlib's."""

    Process = Process  # type: ignore[assignment]

    def get_context(self, method: str | None = None) -> Any:
        if method is None:
            if self._actual_context is None:  # type: ignore[has-type]
                self._actual_context = self._default_context  # type: ignore[attr-defined]
            return self._actual_context
        return _ArrayContext.get_context(self, method)


# Same default start method as the standard library on this platform.
default_context = DefaultContext(
    _concrete[_mpctx._default_context._default_context._name]  # type: ignore[attr-defined]
)
