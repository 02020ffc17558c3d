"""distrib: a distributed multiprocess training runtime for numpy and cupy arrays.

The torch.distributed-style API (``init_process_group``, ``all_reduce`` ...) is
exported here; subpackages hold the rest: ``distrib.multiprocessing`` (a drop-in
for the standard module that passes arrays as shared memory), ``distrib.shm``
(shared-memory arrays), ``distrib.parallel`` (data parallelism),
``distrib.optim`` (Hogwild-ready optimizers) and ``distrib.data`` (samplers).

Names are imported lazily, so ``import distrib`` stays cheap and importing one
part (say ``distrib.shm``) does not pull in ZeroMQ.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import (
    DistAuthError,
    DistBackendError,
    DistClosedError,
    DistError,
    DistMismatchError,
    DistPeerLostError,
    DistStoreError,
    DistTimeoutError,
    DistUsageError,
    ShmError,
    ShmFdLimitError,
    ShmOutOfMemoryError,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "DistAuthError",
    "DistBackendError",
    "DistClosedError",
    "DistError",
    "DistMismatchError",
    "DistPeerLostError",
    "DistStoreError",
    "DistTimeoutError",
    "DistUsageError",
    "FileStore",
    "GroupMember",
    "P2POp",
    "PrefixStore",
    "ProcessGroup",
    "ReduceOp",
    "ShmError",
    "ShmFdLimitError",
    "ShmOutOfMemoryError",
    "Store",
    "TCPStore",
    "Work",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_gather_single",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "default_pg_timeout",
    "destroy_process_group",
    "gather",
    "gather_object",
    "get_backend",
    "get_global_rank",
    "get_group_rank",
    "get_node_local_rank",
    "get_pg_count",
    "get_process_group_ranks",
    "get_rank",
    "get_world_size",
    "group",
    "init_process_group",
    "irecv",
    "is_available",
    "is_initialized",
    "is_torchelastic_launched",
    "isend",
    "monitored_barrier",
    "new_group",
    "new_subgroups",
    "new_subgroups_by_enumeration",
    "record",
    "recv",
    "recv_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
    "send_object_list",
]

# name -> module that defines it (imported on first access); the error classes
# above are imported eagerly since every part of distrib raises them.
_LAZY: dict[str, str] = {
    name: "distrib.comm" for name in __all__ if name not in globals() and name != "record"
}
_LAZY["record"] = "distrib._record"
_SUBMODULES = ("comm", "shm", "multiprocessing", "parallel", "optim", "data", "checkpoint")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"distrib.{name}")
    raise AttributeError(f"module 'distrib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
