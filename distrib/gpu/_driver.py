"""Thin helpers over cupy's CUDA runtime bindings, plus the one driver call cupy lacks.

cupy's memory pool sub-allocates: a cupy array's pointer usually lies inside a
larger ``cudaMalloc`` allocation, and CUDA IPC exports whole allocations. The
driver's ``cuMemGetAddressRange`` (reached through ctypes, since cupy does not
bind it) gives the base and size of the allocation that contains a pointer, so
an array travels as (handle of the base allocation, byte offset).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import socket
from multiprocessing import util as mp_util
from typing import Any

from .._errors import DistBackendError, DistUsageError
from ._driver_files import remove_cuda_ipc_files

__all__ = [
    "allocation_range",
    "bind_device",
    "check_not_forked",
    "device_identity",
    "import_cupy",
    "mark_cuda_used",
    "remove_driver_ipc_files",
]

_libcuda: Any = None
# pid of the process that first touched CUDA through distrib; a forked child
# inherits the value and so can tell that its parent had CUDA initialised.
_cuda_pid: int | None = None

# cudaMemoryType values reported by cudaPointerGetAttributes.
MEMORY_TYPE_DEVICE = 2
MEMORY_TYPE_MANAGED = 3


def import_cupy(what: str) -> Any:
    """Import cupy, or raise a ``DistBackendError`` that says what needed it."""
    try:
        import cupy
    except ImportError as exc:
        raise DistBackendError(
            f"{what} needs cupy, which is not importable on host {socket.gethostname()} "
            f'(pid {os.getpid()}): {exc}. Install it with `pip install "distrib[gpu]"` '
            "on a machine with a CUDA device.",
            op=what,
        ) from None
    return cupy


def mark_cuda_used() -> None:
    """Remember that this process has initialised CUDA (see ``check_not_forked``).

    Also arranges for the driver's IPC file to be removed at exit (see
    ``remove_driver_ipc_files``).
    """
    global _cuda_pid
    if _cuda_pid is None:
        _cuda_pid = os.getpid()
        atexit.register(remove_driver_ipc_files)
        # multiprocessing children leave through os._exit, which skips atexit; priority 0
        # runs after the lease flush/warning hooks (priority 100).
        mp_util.Finalize(None, remove_driver_ipc_files, exitpriority=0)


def remove_driver_ipc_files() -> int:
    """Unlink this process's CUDA driver ``/dev/shm/cuda.shm.*`` files; return how many.

    The driver creates such a file in a process that exports IPC events and
    removes it in its own exit handler, which ``os._exit`` (how multiprocessing
    children leave) skips: seen left behind on an H100 after every worker. Only
    if this process used CUDA, and only once no other process will open its IPC
    handles any more (at exit); mappings already made stay valid. Parents remove
    the files of children that ended without cleaning up (``_cuda_files``).
    """
    if _cuda_pid != os.getpid():
        return 0
    return remove_cuda_ipc_files(os.getpid())


def check_not_forked(what: str) -> None:
    """Raise a clear error if this process was forked from one that had initialised CUDA.

    A CUDA context does not survive ``fork``: every CUDA call in the child fails
    with an opaque initialisation error.
    """
    if _cuda_pid is not None and _cuda_pid != os.getpid():
        raise DistUsageError(
            f"{what}: this process (pid {os.getpid()}) was forked from pid {_cuda_pid} after "
            "that process had initialised CUDA, and CUDA cannot be used in a forked child. "
            "Start workers with the 'spawn' or 'forkserver' method "
            "(distrib.multiprocessing.get_context('spawn')).",
            op=what,
        )


def _driver() -> Any:
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuMemGetAddressRange_v2
        fn.argtypes = [
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_uint64,
        ]
        fn.restype = ctypes.c_int
        _libcuda = lib
    return _libcuda


def bind_device(cupy: Any, device: int) -> None:
    """Make ``device``'s primary context current in this thread.

    cupy's ``Device`` context manager skips ``cudaSetDevice`` when the device
    number already matches, which leaves a fresh thread (a queue's feeder
    thread, a finalizer) without a current context: driver calls and IPC
    opens then fail with "invalid device context" (seen on an H100).
    """
    cupy.cuda.runtime.setDevice(device)


def allocation_range(ptr: int, *, what: str) -> tuple[int, int]:
    """Return ``(base, size)`` of the device allocation that contains ``ptr``.

    The pointer's device context must be current in this thread (``bind_device``).
    """
    base = ctypes.c_uint64(0)
    size = ctypes.c_size_t(0)
    rc = _driver().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr)
    if rc != 0:
        raise DistBackendError(
            f"{what}: cuMemGetAddressRange({ptr:#x}) failed with CUDA driver error {rc}; "
            "the array's memory is not a device allocation this process can export",
            op=what,
        )
    return int(base.value), int(size.value)


def device_identity(device_id: int) -> str:
    """A string naming one physical GPU on one machine (hostname + PCI bus id)."""
    cupy = import_cupy("device_identity")
    bus = cupy.cuda.runtime.deviceGetPCIBusId(device_id)
    return f"{socket.gethostname()}/{bus}"
