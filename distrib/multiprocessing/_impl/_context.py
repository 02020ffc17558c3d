"""Start-method contexts whose queues, pipes, processes and pools share arrays.

Each class here subclasses its standard-library counterpart and changes one
thing: objects are pickled with ``ArrayPickler`` (numpy arrays become
shared-memory handles). Nothing in the standard module is patched or
registered: ``multiprocessing.Queue`` keeps copying arrays.

A spawned Process's arguments are pickled by the stdlib in ``Popen``; we hand
it a ``Preserialized`` wrapper made by ``ArrayPickler``. Queues are in
``_queues``, pipe ends in ``_connection``.

There is one default start method, the standard library's: ``DefaultContext``
reads and sets it through ``multiprocessing.context``'s default context, so
``set_start_method`` here also decides what ``sharedctypes``, ``SyncManager``
and ``ProcessPoolExecutor`` use, and a child (whose ``Process._bootstrap``
forces the stdlib default to its own start method) answers its own.
"""

from __future__ import annotations

import multiprocessing.context as _mpctx
import multiprocessing.process as _mpprocess
import os
import sys
from typing import Any

from ...gpu._driver_files import remove_cuda_ipc_files
from ._connection import Connection, Pipe
from ._pickler import Preserialized
from ._queues import JoinableQueue, Queue, SimpleQueue

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
    """The module-level context; its start method is the standard library's default."""

    Process = Process  # type: ignore[assignment]

    def get_context(self, method: str | None = None) -> Any:
        if method is None:
            return _concrete[_stdlib_default.get_start_method()]
        return _ArrayContext.get_context(self, method)

    def get_start_method(self, allow_none: bool = False) -> Any:
        return _stdlib_default.get_start_method(allow_none)

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        _stdlib_default.set_start_method(method, force)

    def get_all_start_methods(self) -> list[str]:
        return list(_stdlib_default.get_all_start_methods())


# The standard library's default context (public methods only are used).
_stdlib_default: Any = _mpctx._default_context  # type: ignore[attr-defined]
default_context = DefaultContext(None)  # type: ignore[arg-type]
