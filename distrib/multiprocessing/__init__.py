"""Drop-in ``multiprocessing`` whose queues, pipes, processes and pools share numpy arrays.

``import distrib.multiprocessing as multiprocessing`` and numpy arrays travel
as shared memory instead of pickled copies: an array from ``distrib.shm`` is
not copied at all, a private one is copied once into shared memory (arrays up
to DISTRIB_INLINE_THRESHOLD bytes are pickled inline, which is faster there).
Every name of the standard module is here, with contexts for fork, spawn and
forkserver, and its submodules (``distrib.multiprocessing.connection`` is
``multiprocessing.connection``...). The default start method is the standard
module's own (one setting for both); nothing else in it is changed.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing as _stdlib
from typing import Any

from ..shm._strategy import (
    get_all_sharing_strategies,
    get_sharing_strategy,
    set_sharing_strategy,
)
from ._impl._context import Connection, default_context
from ._impl._pickler import ArrayPickler, reduce_ndarray
from ._impl._spawn import (
    ProcessContext,
    ProcessException,
    ProcessExitedException,
    ProcessRaisedException,
)
from ._impl._spawn import spawn as _torch_spawn

__all__ = [
    "Array",
    "ArrayPickler",
    "AuthenticationError",
    "Barrier",
    "BoundedSemaphore",
    "BufferTooShort",
    "Condition",
    "Connection",
    "Event",
    "JoinableQueue",
    "Lock",
    "Manager",
    "Pipe",
    "Pool",
    "Process",
    "ProcessContext",
    "ProcessError",
    "ProcessException",
    "ProcessExitedException",
    "ProcessRaisedException",
    "Queue",
    "RLock",
    "RawArray",
    "RawValue",
    "Semaphore",
    "SimpleQueue",
    "TimeoutError",
    "Value",
    "active_children",
    "allow_connection_pickling",
    "cpu_count",
    "current_process",
    "freeze_support",
    "get_all_sharing_strategies",
    "get_all_start_methods",
    "get_context",
    "get_logger",
    "get_sharing_strategy",
    "get_start_method",
    "ipc_collect",
    "log_to_stderr",
    "parent_process",
    "reduce_ndarray",
    "reducer",
    "set_executable",
    "set_forkserver_preload",
    "set_sharing_strategy",
    "set_start_method",
    "spawn",
]

# Exceptions and helpers that are the same objects as the standard module's.
AuthenticationError = _stdlib.AuthenticationError
BufferTooShort = _stdlib.BufferTooShort
ProcessError = _stdlib.ProcessError
TimeoutError = _stdlib.TimeoutError
current_process = _stdlib.current_process
active_children = _stdlib.active_children
parent_process = _stdlib.parent_process

# Everything else is a bound method of our default context, exactly as the
# standard module binds its own (so Process, Queue, Pool ... use our classes).
Process = default_context.Process
Array = default_context.Array
Barrier = default_context.Barrier
BoundedSemaphore = default_context.BoundedSemaphore
Condition = default_context.Condition
Event = default_context.Event
JoinableQueue = default_context.JoinableQueue
Lock = default_context.Lock
Manager = default_context.Manager
Pipe = default_context.Pipe
Pool = default_context.Pool
Queue = default_context.Queue
RLock = default_context.RLock
RawArray = default_context.RawArray
RawValue = default_context.RawValue
Semaphore = default_context.Semaphore
SimpleQueue = default_context.SimpleQueue
Value = default_context.Value
allow_connection_pickling = default_context.allow_connection_pickling
cpu_count = default_context.cpu_count
freeze_support = default_context.freeze_support
get_all_start_methods = default_context.get_all_start_methods
get_context = default_context.get_context
get_logger = default_context.get_logger
get_start_method = default_context.get_start_method
log_to_stderr = default_context.log_to_stderr
reducer = default_context.reducer
set_executable = default_context.set_executable
set_forkserver_preload = default_context.set_forkserver_preload
set_start_method = default_context.set_start_method


# Log levels of the standard module (not in its __all__ either).
SUBDEBUG: int = _stdlib.SUBDEBUG  # type: ignore[attr-defined]
SUBWARNING: int = _stdlib.SUBWARNING  # type: ignore[attr-defined]

# The standard module's submodules, reachable as ours: each file of this package
# but __init__ is a stdlib module's name and makes it the same module object
# (never a second copy). ``spawn`` stays torch's function, as in torch.multiprocessing.
_SUBMODULES = (
    "connection", "context", "dummy", "forkserver", "heap", "managers", "pool",
    "popen_fork", "popen_forkserver", "popen_spawn_posix", "popen_spawn_win32", "process",
    "queues", "reduction", "resource_sharer", "resource_tracker", "shared_memory",
    "sharedctypes", "spawn", "synchronize", "util",
)  # fmt: skip


def _import_submodules() -> None:
    for name in _SUBMODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            continue  # the other platform's (popen_spawn_win32 on POSIX, and back)


_import_submodules()
# Importing the ``spawn`` submodule bound that name to it here: make it the function again.
spawn = _torch_spawn


def ipc_collect() -> int:
    """Free CUDA IPC memory that consumers have released; returns how many (0 without cupy)."""
    if importlib.util.find_spec("cupy") is None:
        return 0
    try:
        from ..gpu import _ipc as _cuda_ipc
    except ImportError:
        return 0
    collect: Any = getattr(_cuda_ipc, "ipc_collect", None)
    return int(collect() or 0) if collect is not None else 0


def _register_gpu_reducers() -> None:
    # cupy arrays travel as CUDA IPC handles (distrib.gpu._ipc); only when
    # cupy is installed, and find_spec first so machines without it pay nothing.
    if importlib.util.find_spec("cupy") is None:
        return
    try:
        from ..gpu import _ipc as _cuda_ipc
    except ImportError:
        return  # the GPU part is not there (or cupy cannot load): arrays only
    _cuda_ipc.register_reducers(ArrayPickler)


_register_gpu_reducers()
