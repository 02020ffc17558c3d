"""``ProcessGroup``: ordering, failure publication and engine choice for one group.

Every operation takes a ticket when it is issued and runs when all earlier
tickets have finished: synchronous calls run on the caller's thread, async
ones on the group's progress thread, so operations of a group run in issue
order while the caller computes. Collectives also get a sequence number
(``seq``), identical on every rank for the same call.

When an operation fails (timeout, lost peer, mismatch) the group publishes the
error under its store key ``failed`` (first writer wins) and refuses further
calls; engines of the other ranks poll that key while blocked and fail fast
with the same cause instead of waiting out their timeout.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from .._config import config
from .._errors import (
    DistBackendError,
    DistClosedError,
    DistError,
    DistMismatchError,
    DistPeerLostError,
    DistTimeoutError,
)
from ._engine import Engine, EngineContext, make_cpu_engine_for, make_gpu_engine_for
from ._work import Work

__all__ = ["ProcessGroup", "host_id"]

_FAILURE_CLASSES: dict[str, type[DistError]] = {
    c.__name__: c
    for c in (DistTimeoutError, DistPeerLostError, DistMismatchError, DistBackendError, DistError)
}
_FAILURE_STORE_TIMEOUT_S = 1.0  # the failure check must not stall a blocked rank for long
_DIAGNOSE_GRACE_S = 1.0  # how long a timed-out rank follows others' waits to find the culprit


def host_id() -> str:
    """``boot_id/hostname[/node id]``: equal on two ranks iff they may share memory.

    Ranks share memory when they run on one kernel; ``DISTRIB_NODE_ID`` (set by
    ``distrib.ray`` to Ray's node id) splits a machine further, so two Ray nodes
    on one machine talk over the ZeroMQ ring as two hosts would.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "noboot"
    node = config().node_id
    return f"{boot}/{socket.gethostname()}" + (f"/{node}" if node else "")


class ProcessGroup:
    """A set of ranks that run collectives together (torch's ``ProcessGroup``).

    Created by ``init_process_group`` / ``new_group``; not constructed directly.
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        size: int,
        global_ranks: list[int],
        timeout: float,
        backend: str,
        bind_host: str,
        transport: str,
    ) -> None:
        self.store = store
        self._rank, self._size = rank, size
        self.global_ranks = list(global_ranks)
        self.timeout = timeout
        self.backend = backend
        self._failure: DistError | None = None
        # DISTRIB_CHECK_MISMATCH=0 turns the collective consistency check off (read once).
        self.check_mismatch = config().check_mismatch is not False
        self._closed = False
        self._fail_store = store.clone()
        self._fail_store.set_timeout(_FAILURE_STORE_TIMEOUT_S)
        self._fail_store_ok_after = 0.0
        # Host ids double as the group's join barrier: everyone waits for everyone.
        store.set(f"host/{rank}", host_id())
        hosts = [store.get(f"host/{r}").decode() for r in range(size)]
        self._zmq_engine: Engine | None = None
        self._ctx = EngineContext(
            store=store,
            rank=rank,
            size=size,
            global_ranks=self.global_ranks,
            timeout=timeout,
            host_ids=hosts,
            bind_host=bind_host,
            transport=transport,
            check_failed=self._check_failed,
            make_zmq_engine=self._make_zmq_engine,
            diagnose_timeout=self._diagnose_timeout,
        )
        self.cpu_engine = make_cpu_engine_for(self._ctx)
        self._gpu_engine: Engine | None = None
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._running_ticket = 0
        self._seq = itertools.count()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<ProcessGroup rank {self._rank}/{self._size} ranks={self.global_ranks}>"

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    @property
    def global_rank(self) -> int:
        return self.global_ranks[self._rank]

    # -- engines -------------------------------------------------------------

    def _make_zmq_engine(self) -> Engine:
        if self._zmq_engine is None:
            from ._zmq_engine import ZmqEngine

            self._zmq_engine = ZmqEngine(self._ctx)
        return self._zmq_engine

    def engine_for(self, array: Any) -> Engine:
        """The engine moving ``array``'s type: numpy -> CPU, cupy -> GPU (built lazily)."""
        if type(array) is np.ndarray:
            return self.cpu_engine
        if type(array).__module__.split(".")[0] == "cupy":
            if self._gpu_engine is None:
                self._gpu_engine = make_gpu_engine_for(self._ctx)
            return self._gpu_engine
        return self.cpu_engine

    # -- failure publication -------------------------------------------------

    def _check_failed(self) -> None:
        """Raise the failure another rank published for this group, if any."""
        now = time.monotonic()
        if now < self._fail_store_ok_after:
            return
        try:
            if not self._fail_store.check(["failed"]):
                return
            blob = self._fail_store.get("failed")
        except DistError:
            # Store unreachable (its host may be the rank that died): ask less often.
            self._fail_store_ok_after = now + 2.0
            return
        raise self._reported(blob)

    def _reported(self, blob: bytes) -> DistError:
        info = msgpack.unpackb(blob, raw=False)
        cls = _FAILURE_CLASSES.get(info.get("cls"), DistError)
        err = cls(
            f"rank {self.global_rank} stopped: rank {info.get('rank')} reported a failure "
            f"of this group: {info.get('msg')}",
            rank=self.global_rank,
            op=info.get("op"),
            peer=info.get("peer"),
        )
        err.reported_by_peer = True  # type: ignore[attr-defined]  # not re-published
        return err

    def _diagnose_timeout(self, peer: int, seq: int) -> list[int]:
        """Record "waiting for ``peer`` in op ``seq``" and follow the others' records."""
        store = self._fail_store
        try:
            store.set(f"waits/{seq}/{self._rank}", str(peer))
        except DistError:
            return [peer]
        # Ranks waiting on a stuck rank time out at about the same time; give them a moment.
        end = time.monotonic() + min(_DIAGNOSE_GRACE_S, self.timeout / 2)
        chain = [peer]
        while True:
            cur = chain[-1]
            try:
                nxt = store.multi_get([f"waits/{seq}/{cur}"])[0]
            except DistError:
                return chain
            if nxt is not None:
                target = int(nxt)
                if target in chain or target == self._rank:
                    return chain  # a cycle: stop at the last distinct rank
                chain.append(target)
                continue
            if time.monotonic() >= end:
                return chain
            time.sleep(0.05)

    def _publish(self, exc: DistError) -> None:
        info = {
            "cls": type(exc).__name__,
            "rank": exc.rank if exc.rank is not None else self.global_rank,
            "op": exc.op,
            "peer": exc.peer if isinstance(exc.peer, (int, str, type(None))) else str(exc.peer),
            "msg": str(exc),
        }
        try:
            self._fail_store.compare_set("failed", b"", msgpack.packb(info))
        except DistError:
            pass  # the store is gone too; peers will time out or see the disconnect

    # -- execution -----------------------------------------------------------

    def submit(
        self,
        op: str,
        body: Callable[[float, int], list[Any] | None],
        async_op: bool,
        collective: bool = True,
    ) -> Any:
        """Run ``body(deadline, seq)`` after every earlier operation; return a ``Work`` when
        async. Collectives get the next ``seq`` (taken with the ticket, so the two orders
        agree even when several threads issue operations)."""
        if self._closed:
            raise DistClosedError(
                f"{op}: the process group of rank {self.global_rank} was destroyed",
                rank=self.global_rank,
                op=op,
            )
        if self._failure is not None:
            raise self._failure
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            seq = next(self._seq) if collective else -1
        if not async_op:
            # Synchronous: run on the caller's thread, no Work to build (its Event
            # costs microseconds a small all-reduce cannot spare).
            self._execute(ticket, seq, body)
            return None
        work = Work(op, self.global_rank)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._progress, name=f"distrib-progress-{self.global_ranks}", daemon=True
            )
            self._thread.start()
        self._queue.put((ticket, seq, body, work))
        return work

    def _run(self, ticket: int, seq: int, body: Callable[[float, int], Any], work: Work) -> None:
        try:
            result = self._execute(ticket, seq, body)
        except BaseException as exc:
            work._finish(exc)
        else:
            work._finish(None, result)

    def _execute(self, ticket: int, seq: int, body: Callable[[float, int], Any]) -> Any:
        """Wait for ``ticket``'s turn, run ``body``, record a failure for the whole group."""
        if self._running_ticket != ticket:  # an earlier (async) operation is still queued
            with self._cond:
                while self._running_ticket != ticket:
                    self._cond.wait(1.0)
        try:
            if self._failure is not None:
                raise self._failure
            return body(time.monotonic() + self.timeout, seq)
        except DistError as exc:
            if self._failure is None:
                self._failure = exc
                if not getattr(exc, "reported_by_peer", False):
                    self._publish(exc)
                if not getattr(exc, "seen_by_every_rank", False):
                    self.cpu_engine.abort(str(exc))
            raise
        finally:
            with self._cond:
                self._running_ticket += 1
                self._cond.notify_all()

    def _progress(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run(*item)

    def close(self) -> None:
        """Finish queued work (bounded by the timeout), stop the thread, close engines."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(self.timeout + 5.0)
        for engine in {
            id(e): e for e in (self.cpu_engine, self._zmq_engine, self._gpu_engine) if e is not None
        }.values():
            try:
                engine.close()
            except Exception:
                pass
        self._fail_store.close()
