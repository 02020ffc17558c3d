"""Rendezvous stores, process groups and collectives: torch.distributed's API for numpy.

Stores: ``TCPStore`` (ZeroMQ, msgpack, optional HMAC authentication),
``FileStore`` and ``PrefixStore``. Groups: ``init_process_group``,
``new_group`` ... Collectives: ``all_reduce`` and the rest, on numpy arrays
(CPU engine: shared memory or ZeroMQ) and cupy arrays (GPU engine).
"""

from __future__ import annotations

from .._reduce_op import ReduceOp
from ..store import PrefixStore, Store, TCPStore
from ..store._file_store import FileStore
from ._api import (
    Backend,
    GroupMember,
    destroy_process_group,
    get_backend,
    get_rank,
    get_world_size,
    group,
    init_process_group,
    is_initialized,
    new_group,
)
from ._collectives import (
    all_gather,
    all_gather_into_tensor,
    all_reduce,
    all_to_all,
    all_to_all_single,
    barrier,
    broadcast,
    gather,
    reduce,
    reduce_scatter,
    reduce_scatter_tensor,
    scatter,
)
from ._group import ProcessGroup
from ._launch_env import get_node_local_rank, is_torchelastic_launched
from ._monitored import monitored_barrier
from ._objects import (
    all_gather_object,
    broadcast_object_list,
    gather_object,
    recv_object_list,
    scatter_object_list,
    send_object_list,
)
from ._p2p import irecv, isend, recv, send
from ._p2p_batch import P2POp, batch_isend_irecv
from ._subgroups import (
    get_global_rank,
    get_group_rank,
    get_pg_count,
    get_process_group_ranks,
    is_available,
    new_subgroups,
    new_subgroups_by_enumeration,
)
from ._torch_compat import all_gather_single, default_pg_timeout, reduce_scatter_single
from ._work import Work

__all__ = [
    "Backend",
    "FileStore",
    "GroupMember",
    "P2POp",
    "PrefixStore",
    "ProcessGroup",
    "ReduceOp",
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
