"""The GPU path of a process group: pick the engine for cupy arrays, and CUDA-event work.

Engine choice (made once per group, on the first cupy collective): every rank
publishes which physical GPU it uses (hostname + PCI bus id of its current
cupy device) in the group's store; then

- one rank, or every rank on its own GPU -> NCCL (``distrib.transport.gpu._nccl``);
- every rank on the same GPU -> the CUDA-IPC engine (NCCL refuses duplicate
  GPUs; ``distrib.transport.gpu._ipc_engine``);
- a mix (say 4 ranks on 2 GPUs) -> ``DistBackendError`` saying how to fix it.

GPU engines enqueue on the caller's current cupy stream and return; the group
turns that into a ``Work`` with ``comm._work.CudaEventWork`` (a CUDA event recorded after
the enqueued work).
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from ..._errors import DistBackendError
from ...gpu._driver import check_not_forked, device_identity, import_cupy, mark_cuda_used
from .._engine import Engine

__all__ = ["make_gpu_engine", "plan_gpu_engine"]


def plan_gpu_engine(identities: list[str]) -> str:
    """Return ``"nccl"`` or ``"cuda_ipc"`` for the per-rank GPU identities, or raise."""
    distinct = set(identities)
    if len(identities) == 1 or len(distinct) == len(identities):
        return "nccl"
    if len(distinct) == 1:
        return "cuda_ipc"
    layout = ", ".join(f"rank {r}: {ident}" for r, ident in enumerate(identities))
    raise DistBackendError(
        "some ranks share a GPU and others do not, which neither NCCL (one GPU per rank) nor "
        "the CUDA-IPC engine (all ranks on one GPU) supports; give each rank its own GPU "
        "(cupy.cuda.Device(local_rank).use()) or put them all on one. Layout: " + layout,
        op="init_gpu",
    )


def make_gpu_engine(ctx: Any) -> Engine:
    """Build the GPU engine for one group (see the module docstring for the choice).

    ``ctx`` is an ``EngineContext``: its prefixed ``store``, ``rank``, ``size``
    and ``timeout`` are used; the current cupy device is this rank's GPU.
    """
    check_not_forked("GPU collectives")
    cupy = import_cupy("GPU collectives")
    mark_cuda_used()
    device = cupy.cuda.Device().id
    store, rank, size = ctx.store, ctx.rank, ctx.size
    store.set(f"gpu/ident/{rank}", msgpack.packb(device_identity(device)))
    identities = [msgpack.unpackb(store.get(f"gpu/ident/{r}")) for r in range(size)]
    kind = plan_gpu_engine(identities)
    deadline = time.monotonic() + ctx.timeout
    if kind == "cuda_ipc":
        from ._ipc_engine import CudaIpcEngine

        return CudaIpcEngine(
            store, rank, size, device, deadline, check=getattr(ctx, "check_failed", None)
        )
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        nccl = None
        why = str(exc)
    else:
        why = "cupy.cuda.nccl.available is False"
    if nccl is None or not getattr(nccl, "available", False):
        if size == 1:  # one rank needs no communicator: the IPC engine is a local no-op
            from ._ipc_engine import CudaIpcEngine

            return CudaIpcEngine(store, rank, size, device, deadline)
        raise DistBackendError(
            f"rank {rank}/{size}: ranks are on different GPUs, which needs NCCL, but cupy's "
            f"NCCL binding is unavailable ({why}); install NCCL for your CUDA "
            "(pip install nvidia-nccl-cu12 or -cu13)",
            rank=rank,
            op="init_gpu",
        )
    from ._nccl import NcclEngine

    return NcclEngine(store, rank, size, device, ctx.timeout)
