"""The one place that picks a group's engines: shared memory, hierarchical or ZeroMQ
for numpy arrays; NCCL or CUDA IPC for cupy arrays (``transport.gpu``).

Ranks that share a host (equal host ids in the store) map one segment
(``shm._rendezvous``); a group on one host gets a ``ShmEngine``, a group over
several hosts a ``HierEngine`` on top of them. Every rank must choose the same
kind, so the choice is agreed through the store.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .._errors import DistBackendError
from ._engine import Engine, EngineContext
from .hier._engine import HierEngine, leader_context
from .shm._engine import ShmEngine
from .shm._rendezvous import connect_local

__all__ = ["make_cpu_engine", "make_cpu_engine_for", "make_gpu_engine_for"]


def make_cpu_engine_for(ctx: EngineContext) -> Engine:
    """The engine for numpy arrays: ``zmq`` -> ZeroMQ; ``auto``/``shm`` -> shared
    memory or hierarchical when the host layout allows, else ZeroMQ."""
    if ctx.transport != "zmq" and ctx.size > 1:
        engine = make_cpu_engine(ctx)
        if engine is not None:
            return engine
    return ctx.make_zmq_engine()


def make_gpu_engine_for(ctx: EngineContext) -> Engine:
    """The engine for cupy arrays (``transport.gpu``), built on a group's first cupy call."""
    try:
        from .gpu._select import make_gpu_engine
    except ImportError as exc:
        raise DistBackendError(
            f"cupy arrays need the GPU engine (distrib.transport.gpu), which is unavailable: {exc}",
            rank=ctx.global_ranks[ctx.rank],
            op="engine",
        ) from None
    return make_gpu_engine(ctx)


def make_cpu_engine(ctx: Any) -> Engine | None:
    """Pick the CPU engine for a group: shared memory, hierarchical, or ``None`` (ZeroMQ).

    ``ctx`` is the group's ``EngineContext``. Ranks with equal ``host_ids`` share
    a machine. One host: a ``ShmEngine`` over the whole group. Several hosts
    with at least one holding two ranks: a ``HierEngine``. Otherwise, or if any
    rank could not map its host's segment, every rank returns ``None`` together.
    """
    if ctx.size < 2 or os.uname().machine not in ("x86_64", "amd64"):
        # The phase counters rely on x86's in-order stores (TSO); weaker memory
        # models would need explicit fences that Python cannot issue cheaply.
        return None
    hosts: list[list[int]] = []
    index: dict[str, int] = {}
    for r, hid in enumerate(ctx.host_ids):
        if hid not in index:
            index[hid] = len(hosts)
            hosts.append([])
        hosts[index[hid]].append(r)
    if max(len(h) for h in hosts) < 2:
        return None  # no two ranks share memory
    my_host = index[ctx.host_ids[ctx.rank]]
    members = hosts[my_host]
    deadline = time.monotonic() + ctx.timeout
    single_host = len(hosts) == 1
    local: ShmEngine | None = None
    if len(members) > 1:
        local = connect_local(
            ctx.store,
            f"shm/{my_host}",
            members.index(ctx.rank),
            len(members),
            [ctx.global_ranks[r] for r in members],
            deadline,
            check_failed=ctx.check_failed,
        )
    # Every rank must pick the same kind of engine: agree through the store.
    ok = local is not None or len(members) == 1
    ctx.store.set(f"shm/ok/{ctx.rank}", b"1" if ok else b"0")
    ctx.store.wait([f"shm/ok/{r}" for r in range(ctx.size)], max(deadline - time.monotonic(), 1.0))
    if not all(ctx.store.get(f"shm/ok/{r}") == b"1" for r in range(ctx.size)):
        if local is not None:
            local.close()
        return None
    if single_host:
        assert local is not None
        try:
            # send/recv are not collective: they take the ZeroMQ links, built now
            # because building them is collective (every rank publishes its endpoint)
            local.set_p2p(ctx.make_zmq_engine())
        except BaseException:
            local.close()
            raise
        return local
    leaders = [h[0] for h in hosts]
    lead = None
    try:
        if ctx.rank in leaders:
            from .zmq._engine import ZmqEngine

            lead = ZmqEngine(leader_context(ctx, leaders))
        flat = ctx.make_zmq_engine()
    except BaseException:
        for eng in (local, lead):
            if eng is not None:
                eng.close()
        raise
    return HierEngine(ctx.rank, ctx.size, hosts, local, lead, flat, ctx.global_ranks)
