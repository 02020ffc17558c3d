"""Shared-memory collectives among the ranks of one machine.

``ShmEngine`` is the ``Engine`` of a group (or of one host's part of it, under
the hierarchical engine) whose ranks share a machine. It owns:

- one ``SlotPipeline`` (``_pipeline``): the node's segment, the phase
  counters, the step counter, call agreement, barrier and abort. The segment
  is mapped by ``_rendezvous.connect_local``, which builds this engine; it
  stays mapped until ``close``.
- optionally a point-to-point engine (ZeroMQ, ``set_p2p``): send/recv are not
  collective, so they do not fit the lock-step pipeline.

Each collective method checks the trivial one-rank case, views the buffers
as needed and hands them to an algorithm, a function ``f(pipe, ...)`` in
``_reduce`` (all-reduce, reduce, reduce-scatter) or ``_move`` (broadcast,
gathers, scatter, all-to-all), through ``SlotPipeline.run``, which aborts
every local rank if the algorithm fails. The small all-reduce path is
``all_reduce`` -> ``run`` -> ``_reduce.reduce`` -> one-shot step: keep it that
short.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..._errors import DistUsageError
from ..._reduce_op import ReduceOp
from .._calldesc import CallDesc
from .._engine import Engine
from . import _move, _reduce, _small
from ._cma import RemoteReader
from ._native import NativeStep
from ._pipeline import SlotPipeline
from ._segment import SharedSegment
from ._small import SmallAllReduce

__all__ = ["ShmEngine"]


def _bytes(buf: Any) -> np.ndarray:
    return buf.view(np.uint8)


class ShmEngine(Engine):
    """Collectives among ranks that share one segment (one machine).

    All-reduce and reduce compare the call descriptors they are passed
    (``call``) inside their first step (``fused_agreement``); the other
    collectives are preceded by ``agree``, one barrier step that compares
    digests.

    Args:
        segment: this process's mapping of the node's segment (the engine owns it).
        rank, size: local rank and number of local ranks.
        global_ranks: group rank of each local rank (for error messages).
        pids: process id of each local rank (liveness).
        p2p: engine for ``send``/``recv``; ``None`` refuses them until ``set_p2p``.
        check_failed: raises a failure another rank published (polled while waiting).
        cma: every local rank can ``process_vm_readv`` every other (probed at
            rendezvous): large all-reduces then read peers' buffers directly.
        native: the C step's function from ``_native.load`` (agreed by every
            local rank at rendezvous), or ``None`` for the numpy path.
    """

    fused_agreement = frozenset({"all_reduce", "reduce"})

    def __init__(
        self,
        segment: SharedSegment,
        rank: int,
        size: int,
        global_ranks: list[int],
        pids: list[int],
        p2p: Engine | None = None,
        check_failed: Callable[[], None] | None = None,
        cma: bool = False,
        native: Any = None,
    ) -> None:
        self.rank = rank
        self.size = size
        self._pipe = SlotPipeline(
            segment, rank, size, global_ranks, pids, check_failed, cma=cma, native=native
        )
        self._p2p = p2p
        self._small = _small.build(self._pipe, _reduce.one_shot_bytes(self._pipe))

    def small_all_reduce(self) -> SmallAllReduce | None:
        return self._small

    # -- what tests and benchmarks switch: forwarded to the pipeline -----------
    @property
    def _native(self) -> NativeStep | None:
        """The C step (``None``: the numpy path); set to ``None`` to compare paths."""
        return self._pipe.native

    @_native.setter
    def _native(self, step: NativeStep | None) -> None:
        self._pipe.native = step

    @property
    def _reader(self) -> RemoteReader | None:
        """The cross-process reader (``None``: no single-copy all-reduce)."""
        return self._pipe.reader

    @property
    def _pull(self) -> Callable[[int, int, np.ndarray, str], None]:
        """``SlotPipeline.pull``; a test replaces it to die mid-read."""
        return self._pipe.pull

    @_pull.setter
    def _pull(self, fn: Callable[[int, int, np.ndarray, str], None]) -> None:
        self._pipe.pull = fn  # type: ignore[method-assign, assignment]

    # -- reductions --------------------------------------------------------------
    def all_reduce(
        self, buf: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        if self.size > 1:
            self._pipe.run(
                "all_reduce",
                deadline,
                _reduce.reduce,
                buf,
                op,
                None,
                call,
                deadline,
                "all_reduce",
            )

    def reduce(
        self, buf: Any, op: ReduceOp, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        if self.size > 1:
            self._pipe.run(
                "reduce", deadline, _reduce.reduce, buf, op, root, call, deadline, "reduce"
            )

    def reduce_scatter(
        self, buf: Any, out: Any, op: ReduceOp, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        if self.size == 1:
            np.copyto(out, buf)
            return
        self._pipe.run("reduce_scatter", deadline, _reduce.reduce_scatter, buf, out, op, deadline)

    # -- data movement -------------------------------------------------------
    def broadcast(
        self, buf: Any, root: int, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        if self.size > 1:
            self._pipe.run("broadcast", deadline, _move.broadcast, _bytes(buf), root, deadline)

    def all_gather(self, out: Any, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        if self.size > 1:
            self._pipe.run("all_gather", deadline, _move.all_gather, _bytes(out), deadline)

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
        if self.size == 1:
            if out is not None:
                np.copyto(out, buf)
            return
        dst = None if out is None or self.rank != root else _bytes(out)
        self._pipe.run("gather", deadline, _move.gather, _bytes(buf), dst, root, deadline)

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
        if self.size == 1:
            if buf is not None:
                np.copyto(out, buf)
            return
        src = _bytes(buf) if self.rank == root else None
        self._pipe.run("scatter", deadline, _move.scatter, src, _bytes(out), root, deadline)

    def all_to_all(
        self, buf: Any, out: Any, seq: int, deadline: float, *, call: CallDesc | None
    ) -> None:
        if self.size == 1:
            np.copyto(out, buf)
            return
        self._pipe.run("all_to_all", deadline, _move.all_to_all, _bytes(buf), _bytes(out), deadline)

    # -- agreement and barrier ---------------------------------------------------
    def agree(self, call: CallDesc, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._pipe.run(call.op, deadline, SlotPipeline.agree, call, deadline)

    def barrier(self, seq: int, deadline: float, *, call: CallDesc | None) -> None:
        if self.size > 1:
            self._pipe.run("barrier", deadline, SlotPipeline.barrier, deadline)

    # -- point to point --------------------------------------------------------
    def send(self, buf: Any, dst: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        self._p2p_engine("send").send(buf, dst, tag, deadline, call=call)

    def recv(self, buf: Any, src: int, tag: int, deadline: float, *, call: CallDesc | None) -> None:
        self._p2p_engine("recv").recv(buf, src, tag, deadline, call=call)

    def await_p2p(self, src: int, tag: int, deadline: float, give_way: Callable[[], bool]) -> bool:
        return self._p2p is None or self._p2p.await_p2p(src, tag, deadline, give_way)

    def has_p2p(self, src: int, tag: int) -> bool:
        return self._p2p is None or self._p2p.has_p2p(src, tag)

    def has_verdict(self, dst: int, tag: int, n: int) -> bool:
        return self._p2p is None or self._p2p.has_verdict(dst, tag, n)

    def last_send(self, dst: int, tag: int) -> int:
        return self._p2p.last_send(dst, tag) if self._p2p is not None else 0

    def confirm_send(
        self,
        dst: int,
        tag: int,
        n: int,
        call: CallDesc | None,
        deadline: float,
        give_way: Callable[[], bool] | None = None,
    ) -> bool:
        return self._p2p_engine("send").confirm_send(dst, tag, n, call, deadline, give_way)

    def set_p2p(self, engine: Engine) -> None:
        """Use ``engine`` for ``send``/``recv`` (and close it with this one)."""
        self._p2p = engine

    def _p2p_engine(self, op: str) -> Engine:
        if self._p2p is None:
            me = self._pipe.me
            raise DistUsageError(
                f"{op}: this shared-memory engine (rank {me}) has no point-to-point "
                "transport; use the ZeroMQ engine (DISTRIB_TRANSPORT=zmq)",
                rank=me,
                op=op,
            )
        return self._p2p

    # -- lifecycle -------------------------------------------------------------
    def abort(self, reason: str, culprit: int | None = None, cls_name: str = "") -> None:
        self._pipe.abort(reason, culprit)
        if self._p2p is not None:
            self._p2p.abort(reason, culprit, cls_name)

    def close(self) -> None:
        if self._pipe.closed:
            return
        if self._small is not None:
            self._small.close()  # before the segment goes: it holds raw addresses into it
        self._pipe.close()
        if self._p2p is not None:
            self._p2p.close()
