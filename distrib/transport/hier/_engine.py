"""Hierarchical collectives for a group that spans several machines.

Each host's ranks share one ``ShmEngine``; the first rank of each host (its
*leader*) also belongs to a ZeroMQ engine among the leaders. All-reduce is
intra-node reduce to the leader -> ring all-reduce among leaders -> intra-node
broadcast, so only one copy of the data per host crosses the network.
Broadcast and all-gather are hierarchical too; the remaining collectives
(reduce, reduce-scatter, gather, scatter, all-to-all, send/recv) go through the
group's flat ZeroMQ engine, which any host layout supports.

Every rank of a host makes the same sequence of local calls, and every leader
the same sequence of leader calls, so the lock-step shared-memory pipeline and
the leaders' ZeroMQ sequence numbers stay matched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..._errors import DistError
from ..._reduce_op import ReduceOp
from .._calldesc import CallDesc
from .._engine import Engine, EngineContext
from ..shm._engine import ShmEngine

__all__ = ["HierEngine", "leader_context"]


def leader_context(ctx: EngineContext, leaders: list[int]) -> EngineContext:
    """An ``EngineContext`` for the sub-group of host leaders (group ranks ``leaders``)."""
    from ...store import PrefixStore

    return EngineContext(
        store=PrefixStore("hier/leaders", ctx.store),
        rank=leaders.index(ctx.rank),
        size=len(leaders),
        global_ranks=[ctx.global_ranks[r] for r in leaders],
        timeout=ctx.timeout,
        host_ids=[ctx.host_ids[r] for r in leaders],
        bind_host=ctx.bind_host,
        transport="zmq",
        check_failed=ctx.check_failed,
    )


class HierEngine(Engine):
    """Shared memory inside each host, ZeroMQ among host leaders.

    Args:
        rank, size: group rank and size.
        hosts: group ranks of each host, hosts ordered by their first rank.
        local: this host's shared-memory engine (``None`` if alone on it).
        leaders: the leaders' ZeroMQ engine (``None`` unless this rank leads).
        flat: the group's ZeroMQ engine, for the non-hierarchical collectives.
        global_ranks: global rank of each group rank (for messages).
    """

    # No fused agreement: the group agrees through our all_gather (Engine.agree) first, so
    # collectives ignore their ``call`` and pass the sub-engines ``call=None``; send and
    # recv hand theirs to the flat engine, which sends or compares it.

    def __init__(
        self,
        rank: int,
        size: int,
        hosts: list[list[int]],
        local: ShmEngine | None,
        leaders: Engine | None,
        flat: Engine,
        global_ranks: list[int],
    ) -> None:
        self.rank, self.size = rank, size
        self._hosts = hosts
        self._host_of = {r: h for h, members in enumerate(hosts) for r in members}
        self._my_host = self._host_of[rank]
        self._members = hosts[self._my_host]
        self._local_rank = self._members.index(rank)
        self._local = local
        self._leaders = leaders
        self._flat = flat
        self._global = global_ranks

    # -- plumbing ------------------------------------------------------------
    def _guard(self, op: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        # A leader failing across hosts must release its local ranks at once.
        try:
            fn(*args, **kwargs)
        except DistError as exc:
            if self._local is not None:
                self._local.abort(f"rank {self._global[self.rank]} failed in {op}: {exc}")
            raise

    def _lead(self) -> Engine | None:
        return self._leaders

    # -- hierarchical collectives ------------------------------------------------
    def all_reduce(
        self, buf: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        self._guard("all_reduce", self._all_reduce, buf, op, seq, deadline)

    def _all_reduce(self, buf: Any, op: ReduceOp, seq: int, deadline: float) -> None:
        if self._local is not None:
            # into the leader (local rank 0)
            self._local.reduce(buf, op, 0, seq, deadline, call=None)
        lead = self._lead()
        if lead is not None:
            lead.all_reduce(buf, op, seq, deadline, call=None)
        if self._local is not None:
            self._local.broadcast(buf, 0, seq, deadline, call=None)

    def broadcast(
        self, buf: Any, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        self._guard("broadcast", self._broadcast, buf, root, seq, deadline)

    def _broadcast(self, buf: Any, root: int, seq: int, deadline: float) -> None:
        root_host = self._host_of[root]
        on_root_host = root_host == self._my_host
        if on_root_host and self._local is not None:
            # the root's host first: its leader then holds the data
            self._local.broadcast(buf, self._members.index(root), seq, deadline, call=None)
        lead = self._lead()
        if lead is not None:
            lead.broadcast(buf, root_host, seq, deadline, call=None)
        if not on_root_host and self._local is not None:
            self._local.broadcast(buf, 0, seq, deadline, call=None)

    def all_gather(self, out: Any, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        self._guard("all_gather", self._all_gather, out, seq, deadline)

    def _all_gather(self, out: Any, seq: int, deadline: float) -> None:
        m = out.size // self.size
        widest = max(len(h) for h in self._hosts)
        mine = out[self.rank * m : (self.rank + 1) * m]
        lead = self._lead()
        # 1. the leader collects its host's blocks (local rank order)
        host_blocks = np.empty(len(self._members) * m, out.dtype) if lead is not None else None
        if self._local is not None:
            self._local.gather(mine, host_blocks, 0, seq, deadline, call=None)
        elif host_blocks is not None:
            np.copyto(host_blocks, mine)
        # 2. leaders exchange padded per-host blocks, then place them by group rank
        if lead is not None:
            assert host_blocks is not None
            padded = np.zeros(len(self._hosts) * widest * m, out.dtype)
            base = self._my_host * widest * m
            padded[base : base + host_blocks.size] = host_blocks
            lead.all_gather(padded, seq, deadline, call=None)
            for h, members in enumerate(self._hosts):
                for j, r in enumerate(members):
                    src = padded[(h * widest + j) * m : (h * widest + j + 1) * m]
                    np.copyto(out[r * m : (r + 1) * m], src)
        # 3. the leader hands the whole result to its host
        if self._local is not None:
            self._local.broadcast(out, 0, seq, deadline, call=None)

    def barrier(self, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        self._guard("barrier", self._barrier, seq, deadline)

    def _barrier(self, seq: int, deadline: float) -> None:
        if self._local is not None:
            self._local.barrier(seq, deadline, call=None)  # everyone on this host arrived
        lead = self._lead()
        if lead is not None:
            lead.barrier(seq, deadline, call=None)  # every host arrived
        if self._local is not None:
            self._local.barrier(seq, deadline, call=None)  # release this host

    # -- flat collectives ----------------------------------------------------------
    def reduce(
        self, buf: Any, op: ReduceOp, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        self._guard("reduce", self._flat.reduce, buf, op, root, seq, deadline, call=None)

    def reduce_scatter(
        self, buf: Any, out: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        self._guard(
            "reduce_scatter", self._flat.reduce_scatter, buf, out, op, seq, deadline, call=None
        )

    def gather(
        self,
        buf: Any,
        out: Any | None,
        root: int,
        seq: int,
        deadline: float,
        *,
        call: CallDesc | None,
    ) -> None:
        self._guard("gather", self._flat.gather, buf, out, root, seq, deadline, call=None)

    def scatter(
        self,
        buf: Any | None,
        out: Any,
        root: int,
        seq: int,
        deadline: float,
        *,
        call: CallDesc | None,
    ) -> None:
        self._guard("scatter", self._flat.scatter, buf, out, root, seq, deadline, call=None)

    def all_to_all(
        self, buf: Any, out: Any, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        self._guard("all_to_all", self._flat.all_to_all, buf, out, seq, deadline, call=None)

    def send(self, buf: Any, dst: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        self._flat.send(buf, dst, tag, deadline, call=call)

    def recv(self, buf: Any, src: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        self._flat.recv(buf, src, tag, deadline, call=call)

    # -- lifecycle -------------------------------------------------------------------
    def await_p2p(self, src: int, tag: int, deadline: float, give_way: Callable[[], bool]) -> bool:
        return self._flat.await_p2p(src, tag, deadline, give_way)

    def has_p2p(self, src: int, tag: int) -> bool:
        return self._flat.has_p2p(src, tag)

    def has_verdict(self, dst: int, tag: int, n: int) -> bool:
        return self._flat.has_verdict(dst, tag, n)

    def last_send(self, dst: int, tag: int) -> int:
        return self._flat.last_send(dst, tag)

    def confirm_send(
        self,
        dst: int,
        tag: int,
        n: int,
        call: CallDesc | None,
        deadline: float,
        give_way: Callable[[], bool] | None = None,
    ) -> bool:
        return self._flat.confirm_send(dst, tag, n, call, deadline, give_way)

    def abort(self, reason: str, culprit: int | None = None, cls_name: str = "") -> None:
        for eng in (self._local, self._leaders, self._flat):
            if eng is not None:
                eng.abort(reason, culprit, cls_name)

    def close(self) -> None:
        for eng in (self._local, self._leaders, self._flat):
            if eng is not None:
                try:
                    eng.close()
                except Exception:
                    pass
