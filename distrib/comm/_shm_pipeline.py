"""The step protocol under every shared-memory collective of one machine.

Every collective is a pipeline of *steps*. In step ``k`` each rank uses half
``k % 2`` of its own slot in the node's segment (``_shm_segment``): it writes
what the others need, signals phase ``2k+1``, reads what it needs straight out
of the others' slots, and signals phase ``2k+2`` (``_shm_sync``). A step moves
at most ``size * part_bytes`` bytes, so each rank's share stays cache-sized,
and two halves let step ``k+1`` fill while step ``k`` drains. Before writing a
half again (step ``k+2``) a rank waits until everyone signalled ``2k+3``, i.e.
finished step ``k`` entirely (the next op may split the half differently).
Every rank signals ``2k+2`` in every step of every collective, so the counters
stay in lock-step across operations.

``ShmPipeline`` holds that bookkeeping, the call-descriptor check, the barrier,
failure handling (any failure aborts the engine for every local rank, so the
others raise at once instead of waiting for their own timeout) and lifecycle;
``_shm_reduce`` and ``_shm_engine`` build the collectives on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from .._errors import (
    DistClosedError,
    DistError,
    DistMismatchError,
    DistPeerLostError,
    DistTimeoutError,
    DistUsageError,
)
from ._engine import Engine
from ._shm_cma import RemoteReader
from ._shm_native import NativeStep
from ._shm_segment import SharedSegment
from ._shm_sync import PhaseSync

__all__ = ["ShmPipeline"]


def _bounds(count: int, parts: int) -> list[int]:
    """Offsets splitting ``count`` items into ``parts`` near-equal parts."""
    return [q * count // parts for q in range(parts + 1)]


def _describe(desc: bytes) -> str:
    """``all_reduce(shape=[3], ...)`` from a call descriptor (msgpack map)."""
    try:
        d = dict(msgpack.unpackb(desc, raw=False))
        return f"{d.pop('op')}(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"
    except Exception:
        return repr(desc)


class ShmPipeline(Engine):
    """Step bookkeeping, checks, barrier and lifecycle of the shared-memory engine.

    Mismatch detection (``verifies_descriptors``): each rank publishes a digest
    of the group's call descriptor in its header line; all-reduce compares them
    inside its first step (free), other collectives run one extra barrier step.

    Args:
        segment: this process's mapping of the node's segment.
        rank, size: local rank and number of local ranks.
        global_ranks: group rank of each local rank (for error messages).
        pids: process id of each local rank (liveness).
        p2p: engine for ``send``/``recv`` (point-to-point is not collective,
            so it does not fit the lock-step pipeline); ``None`` refuses them.
        check_failed: raises a failure another rank published (polled while waiting).
        store: the group's store, used only to name both calls in a mismatch error.
        verify: compare call descriptors across ranks (``DISTRIB_CHECK_MISMATCH``).
        cma: every local rank can ``process_vm_readv`` every other (probed at
            rendezvous): large all-reduces then read peers' buffers directly.
        native: the C step's function from ``_shm_native.load`` (agreed by
            every local rank at rendezvous), or ``None`` for the numpy path.
    """

    def __init__(
        self,
        segment: SharedSegment,
        rank: int,
        size: int,
        global_ranks: list[int],
        pids: list[int],
        p2p: Engine | None = None,
        check_failed: Callable[[], None] | None = None,
        store: Any = None,
        verify: bool = True,
        cma: bool = False,
        native: Any = None,
    ) -> None:
        self.rank = rank
        self._native: NativeStep | None = None
        self._pids = pids
        self._reader = RemoteReader() if cma else None
        self.verifies_descriptors = verify
        self._store = store  # only to show both descriptors in a mismatch error
        self._digest_of: tuple[bytes, int] = (b"", 0)
        self.size = size
        self._seg = segment
        self._global = global_ranks
        self._sync = PhaseSync(
            segment.header, segment.addr, rank, size, global_ranks, pids, check_failed=check_failed
        )
        self._sync.publish_pid()
        if native is not None and 2 <= size <= NativeStep.MAX_RANKS:
            lay = segment.layout
            halves = [
                [segment.addr + lay.slot_offset(q) + h * lay.half_bytes for q in range(size)]
                for h in (0, 1)
            ]
            counters, waiting = self._sync.native_words()
            self._native = NativeStep(native, halves, counters, waiting, rank)
        self._part_bytes = segment.layout.part_bytes
        self._half_bytes = segment.layout.half_bytes
        self._step = 0  # pipeline steps completed; identical on every local rank
        self._p2p = p2p
        self._closed = False

    # -- step bookkeeping --------------------------------------------------
    def _begin(self, op: str, deadline: float) -> int:
        if self._closed:
            raise DistClosedError(
                f"{op}: the shared-memory engine of rank {self._global[self.rank]} is closed",
                rank=self._global[self.rank],
                op=op,
            )
        self._sync.check(op)  # aborted (here or by another local rank): fail now
        k = self._step
        if k >= 2:
            # The half we are about to overwrite was read during step k-2, and
            # this op may lay it out differently; wait until every rank has
            # started step k-1 (signalled 2k-1), i.e. finished step k-2.
            self._sync.wait_all(2 * k - 1, op, deadline)
        return k

    def _run(self, op: str, deadline: float, body: Any, *args: Any, check: bool = True) -> None:
        """Run ``body(*args)`` (after a descriptor check step); abort everyone on failure."""
        try:
            if check and self.verifies_descriptors:
                self._check_step(op, deadline)
            body(*args)
        except DistClosedError:
            raise
        except DistError as exc:
            # tell the other local ranks at once, naming the rank at fault
            culprit = None
            if isinstance(exc, (DistPeerLostError, DistTimeoutError)):
                culprit = exc.peer
            self._sync.abort(f"rank {self._global[self.rank]} failed in {op}: {exc}", culprit)
            raise
        except BaseException as exc:
            self._sync.abort(f"rank {self._global[self.rank]} failed in {op}: {exc!r}")
            raise

    def _part(self, dtype: np.dtype) -> int:
        return max(1, self._part_bytes // dtype.itemsize)

    # -- mismatch detection ----------------------------------------------------
    def _digest(self) -> int:
        desc = self.call_descriptor
        if self._digest_of[0] is not desc:
            d = int.from_bytes(hashlib.blake2b(desc, digest_size=8).digest(), "little")
            self._digest_of = (desc, d)
        return self._digest_of[1]

    def _compare_digest(self, q: int, h: int, k: int, name: str) -> None:
        if self._sync.digest(q, h) == self._digest_of[1]:
            return
        me, other = self._global[self.rank], self._global[q]
        theirs = "a different collective"
        if self._store is not None:
            try:
                self._store.set(f"shm/desc/{k}/{me}", self.call_descriptor)
                self._store.wait([f"shm/desc/{k}/{other}"], 5.0)
                theirs = _describe(self._store.get(f"shm/desc/{k}/{other}"))
            except Exception:
                pass
        raise DistMismatchError(
            f"{name}: mismatched collectives: rank {me} called "
            f"{_describe(self.call_descriptor)} but rank {other} called {theirs}",
            rank=me,
            op=name,
            peer=other,
        )

    def _check_step(self, name: str, deadline: float) -> None:
        """One barrier step that compares every rank's call digest."""
        digest = self._digest()
        k = self._begin(name, deadline)
        h = k & 1
        self._sync.publish_digest(h, digest)
        self._sync.signal(2 * k + 1)
        for q in range(self.size):
            if q != self.rank:
                self._sync.wait(q, 2 * k + 1, name, deadline)
                self._compare_digest(q, h, k, name)
        self._sync.signal(2 * k + 2)
        self._step = k + 1

    def barrier(self, seq: int, deadline: float) -> None:
        if self.size > 1:
            self._run("barrier", deadline, self._barrier, deadline)

    def _barrier(self, deadline: float, name: str = "barrier") -> None:
        k = self._begin(name, deadline)
        self._sync.signal(2 * k + 1)
        self._sync.wait_all(2 * k + 1, name, deadline)
        self._sync.signal(2 * k + 2)
        self._step = k + 1

    # -- point to point --------------------------------------------------------
    def send(self, buf: Any, dst: int, tag: int, deadline: float) -> None:
        self._p2p_engine("send").send(buf, dst, tag, deadline)

    def recv(self, buf: Any, src: int, tag: int, deadline: float) -> None:
        self._p2p_engine("recv").recv(buf, src, tag, deadline)

    def set_p2p(self, engine: Engine) -> None:
        """Use ``engine`` for ``send``/``recv`` (and close it with this one)."""
        self._p2p = engine

    def _p2p_engine(self, op: str) -> Engine:
        if self._p2p is None:
            raise DistUsageError(
                f"{op}: this shared-memory engine (rank {self._global[self.rank]}) has no "
                "point-to-point transport; use the ZeroMQ engine (DISTRIB_TRANSPORT=zmq)",
                rank=self._global[self.rank],
                op=op,
            )
        return self._p2p

    # -- lifecycle -------------------------------------------------------------
    def abort(self, reason: str) -> None:
        self._sync.abort(reason)
        if self._p2p is not None:
            self._p2p.abort(reason)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sync.close()
        self._seg.close()
        if self._p2p is not None:
            self._p2p.close()
