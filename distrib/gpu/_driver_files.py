"""The CUDA driver's per-process files in /dev/shm, and removing those of ended processes.

A process that exports CUDA IPC events gets ``/dev/shm/cuda.shm.<n>.<pid hex>.<n>``
from the driver, which only the driver's own exit handler removes: ``kill -9``
and ``os._exit`` (how multiprocessing children leave) skip it. Standard library
only, so the launcher can use it without importing numpy.
"""

from __future__ import annotations

import os

__all__ = ["remove_cuda_ipc_files"]

_SHM = "/dev/shm"


def remove_cuda_ipc_files(pid: int) -> int:
    """Unlink process ``pid``'s driver files; return how many.

    Call it for a process that has ended (or for this one at exit): another
    process opening its IPC event handles afterwards would fail.
    """
    suffix = f"{pid:x}"
    try:
        names = os.listdir(_SHM)
    except OSError:
        return 0
    removed = 0
    for name in names:
        parts = name.split(".")
        if len(parts) == 5 and parts[:2] == ["cuda", "shm"] and parts[3] == suffix:
            try:
                os.unlink(os.path.join(_SHM, name))
                removed += 1
            except OSError:
                pass
    return removed
