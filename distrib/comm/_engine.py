"""The one interface every collective backend implements.

A ``ProcessGroup`` validates arguments, checks that ranks agree (mismatch
detection), orders operations on its progress thread and turns results into
``Work`` objects; an ``Engine`` only moves contiguous 1-D buffers among the
group's ranks. Engines: the ZeroMQ ring (reference, any host layout), the
intra-node shared-memory engine, the hierarchical composition of the two, and
on GPUs NCCL and the CUDA-IPC engine for ranks that share one device.

Contract for every method:
- buffers are C-contiguous, 1-D, of one numeric dtype, identical in dtype and
  length on every rank unless the method says otherwise (the group has checked);
- ``deadline`` is an absolute ``time.monotonic()`` value; past it the engine
  raises ``DistTimeoutError`` naming its rank, the operation and the peer it was
  waiting for; a peer known to be gone raises ``DistPeerLostError``;
- methods are called from one thread at a time (the group's progress thread),
  in the same order on every rank; ``seq`` is the group's operation counter,
  identical on every rank for the same call, usable to tag messages;
- ``rank`` / ``size`` are group-local (0 .. size-1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ._ops import ReduceOp


class Engine(ABC):
    """Moves contiguous buffers among the ranks of one group."""

    rank: int
    size: int

    @abstractmethod
    def all_reduce(self, buf: Any, op: ReduceOp, seq: int, deadline: float) -> None:
        """Reduce ``buf`` across ranks in place; every rank ends with the result."""

    @abstractmethod
    def broadcast(self, buf: Any, root: int, seq: int, deadline: float) -> None:
        """Copy root's ``buf`` into every other rank's ``buf``."""

    @abstractmethod
    def reduce(self, buf: Any, op: ReduceOp, root: int, seq: int, deadline: float) -> None:
        """Reduce into root's ``buf``; other ranks' ``buf`` may be used as scratch."""

    @abstractmethod
    def all_gather(self, out: Any, seq: int, deadline: float) -> None:
        """``out`` has size*m elements; on entry rank r's block r holds its input; fill the rest."""

    @abstractmethod
    def reduce_scatter(self, buf: Any, out: Any, op: ReduceOp, seq: int, deadline: float) -> None:
        """``buf`` has size*m elements; rank r gets the reduction of block r in ``out`` (m)."""

    @abstractmethod
    def gather(self, buf: Any, out: Any | None, root: int, seq: int, deadline: float) -> None:
        """Root's ``out`` (size*m) gets every rank's ``buf`` (m) in rank order."""

    @abstractmethod
    def scatter(self, buf: Any | None, out: Any, root: int, seq: int, deadline: float) -> None:
        """Rank r's ``out`` (m) gets block r of root's ``buf`` (size*m)."""

    @abstractmethod
    def all_to_all(self, buf: Any, out: Any, seq: int, deadline: float) -> None:
        """Block j of rank i's ``buf`` (size*m) lands in block i of rank j's ``out``."""

    @abstractmethod
    def barrier(self, seq: int, deadline: float) -> None:
        """Return once every rank has entered."""

    @abstractmethod
    def send(self, buf: Any, dst: int, tag: int, deadline: float) -> None:
        """Point-to-point send; matched with ``recv`` by (source, tag) in order."""

    @abstractmethod
    def recv(self, buf: Any, src: int, tag: int, deadline: float) -> None:
        """Point-to-point receive into ``buf``."""

    def abort(self, reason: str) -> None:  # noqa: B027 - optional hook
        """Make blocked and future calls fail fast (a peer was reported dead)."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets, shared memory and threads; idempotent."""
