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
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

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
from .._reduce_op import ReduceOp
from .._sched_slice import enabled as sched_slice_enabled
from .._sched_slice import keep_short as keep_short_slice
from .._sched_slice import restore as restore_slice
from .._xp import is_cupy
from ..transport._calldesc import CallDesc, CallsDiffer, digest, mismatch_error
from ..transport._engine import Engine, EngineContext
from ..transport._select import make_cpu_engine_for, make_gpu_engine_for
from ._blocked import BlockWatch
from ._flight import MASK, FlightRecorder, State
from ._recv_order import ReceiveOrder
from ._work import Work

__all__ = ["GAVE_WAY", "NON_GROUP_MEMBER", "ProcessGroup", "host_id"]

# What ``new_group`` returns to ranks outside the group (torch's
# ``GroupMember.NON_GROUP_MEMBER``): calls on it are no-ops.
NON_GROUP_MEMBER: Any = object()

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


def _failure_record(blob: Any) -> dict[str, Any] | None:
    """Decode the group's failure record; ``None`` for anything that is not one."""
    if not isinstance(blob, bytes) or len(blob) > 1 << 20:
        return None
    try:
        info = msgpack.unpackb(blob, raw=False, strict_map_key=False, max_ext_len=0)
    except Exception:  # msgpack raises many types on garbage
        return None
    return info if isinstance(info, dict) else None


class _Work(Work):
    """A ``Work`` whose untimed ``wait`` marks its collective as one the caller is blocked
    in: a wait cycle through it with another group's collective is then a mismatch
    (``_blocked``), as for a synchronous call."""

    def __init__(self, op: str, rank: int, flight: FlightRecorder, seq: int) -> None:
        super().__init__(op, rank)
        self._flight, self._seq = flight, seq

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            entry = self._flight.entry(self._seq)
            if entry is not None:
                entry.sync = True
        return super().wait(timeout)


class _Job(NamedTuple):
    """One queued operation: ``action(engine, call, seq, deadline)``, agreed on first when
    ``call`` is set (collectives; point-to-point has no call to agree on). The action gets
    what ``ProcessGroup.agree`` returned (``None`` when nothing was agreed on) and passes
    it to the engine as ``call=``."""

    engine: Engine | None
    call: CallDesc | None
    action: Callable[[Any, CallDesc | None, int, float], Any]
    # A step of submit_giving_way: whether running it now would get anywhere (None:
    # never, it only waits).
    ready: Callable[[], bool] | None = None
    # Seconds this operation may take once it starts (None: the group's timeout).
    timeout: float | None = None


# What a step run by ``submit_giving_way`` returns when it gave way to later work.
GAVE_WAY: Any = object()


class _SmallCall(NamedTuple):
    """A small all-reduce's description for the compiled road, cached per shape, dtype
    and op: ``op_code`` -1 when that road cannot run it."""

    op_code: int
    call: CallDesc
    digest: int


class ProcessGroup:
    """A set of ranks that run collectives together (torch's ``ProcessGroup``).

    Created by ``init_process_group`` / ``new_group``; not constructed directly.
    """

    # The default group of this process (``init_process_group``). A forked child
    # does not inherit it (``_forget_in_child``): the group belongs to its parent.
    default: ClassVar[ProcessGroup | None] = None

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
        self.global_rank: int = self.global_ranks[rank]  # an attribute: read on every call
        self.group_key = tuple(self.global_ranks)  # names the group in call descriptors
        self.timeout = timeout
        self.backend = backend
        self._failure: DistError | None = None
        self._reported_error: DistError | None = None  # came from another rank: not re-published
        # DISTRIB_CHECK_MISMATCH=0 turns the collective consistency check off (read once).
        self.check_mismatch = config().check_mismatch is not False
        # Reads DISTRIB_SHORT_SLICE and probes the kernel now, so a bad value fails here
        # and the first wait on a peer makes no probe (_sched_slice).
        sched_slice_enabled()
        self._closed = False
        self._fail_store = store.clone()
        self._fail_store.set_timeout(_FAILURE_STORE_TIMEOUT_S)
        self._fail_store_ok_after = 0.0
        # Host ids double as the group's join barrier: everyone waits for everyone.
        store.set(f"host/{rank}", host_id())
        hosts = [store.get(f"host/{r}").decode() for r in range(size)]
        self._zmq_engine: Engine | None = None
        # Written when work is issued while a point-to-point wait may step aside for it
        # (``_p2p_waiting``); that wait polls the read end beside its sockets.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._p2p_waiting = False
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
            wake_fd=self._wake_r,
        )
        self.cpu_engine = make_cpu_engine_for(self._ctx)
        self._gpu_engine: Engine | None = None
        self._cond_lock = threading.RLock()  # taken directly on the compiled road: cheaper
        self._cond = threading.Condition(self._cond_lock)
        self._next_ticket = 0
        self._running_ticket = 0
        # Steps of submit_giving_way queued and not running, by ticket.
        self._giving_way: dict[int, _Job] = {}
        self._seq = itertools.count()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.flight = FlightRecorder(self.global_ranks, self.global_rank)
        self.receive_order = ReceiveOrder()  # point-to-point receives, matched in post order
        # Collectives of two groups waiting for each other (see _blocked): judged only
        # from the engines' slow path, through the job's store without our prefix.
        self._watch: BlockWatch | None = None
        if self.check_mismatch and size > 1:
            root = getattr(self._fail_store, "store", self._fail_store)
            self._watch = BlockWatch(root, self.flight, self)
        # The compiled road for small synchronous all-reduces (all_reduce_small).
        self._small = self.cpu_engine.small_all_reduce() if size > 1 else None
        self._small_calls: dict[tuple[Any, ...], _SmallCall] = {}

    def __repr__(self) -> str:
        return f"<ProcessGroup rank {self._rank}/{self._size} ranks={self.global_ranks}>"

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    # -- engines -------------------------------------------------------------

    def _make_zmq_engine(self) -> Engine:
        if self._zmq_engine is None:
            from ..transport.zmq._engine import ZmqEngine

            self._zmq_engine = ZmqEngine(self._ctx)
        return self._zmq_engine

    def engine_for(self, array: Any) -> Engine:
        """The engine moving ``array``'s type: numpy -> CPU, cupy -> GPU (built lazily)."""
        if type(array) is np.ndarray:
            return self.cpu_engine
        if is_cupy(array):
            if self._gpu_engine is None:
                self._gpu_engine = make_gpu_engine_for(self._ctx)
            return self._gpu_engine
        return self.cpu_engine

    # -- call agreement --------------------------------------------------------

    def agree(self, engine: Engine, call: CallDesc, seq: int, deadline: float) -> CallDesc | None:
        """Make every rank agree on ``call`` (op ``seq``) before ``engine`` moves data;
        return the ``call=`` to pass to the engine's collective.

        The engine's own step does it for the collectives in its ``fused_agreement``:
        ``call`` is returned for the engine to check. Otherwise ``Engine.agree`` runs
        here first (GPU engines without their own check agree through the CPU engine,
        which carries the small digests cheaply) and ``None`` is returned: nothing is
        left to check, as when mismatch checks are off or the group has one rank.
        A disagreement raises ``CallsDiffer`` on every rank; ``_execute`` names it.
        """
        if not self.check_mismatch or self._size == 1:
            return None
        if call.op in engine.fused_agreement:
            return call
        agreer = engine if engine is self.cpu_engine or engine is self._zmq_engine else None
        (agreer or self.cpu_engine).agree(call, seq, deadline)
        return None

    # -- failure publication -------------------------------------------------

    def _check_failed(self) -> None:
        """Raise the failure another rank published for this group, if any, or a wait
        cycle with another group's collective (``_blocked``)."""
        if self._watch is not None:
            self._watch.poll()
        now = time.monotonic()
        if now < self._fail_store_ok_after:
            return
        try:
            if not self._fail_store.check(["failed"]):
                return
            blob = self._fail_store.get("failed")
        except DistPeerLostError as exc:
            # The store's host closed our connection: when rank 0 hosts it, rank 0 died.
            # Named after the operation this rank was in, not the store's own request.
            entry = self.flight.entry(self.flight.running)
            op = entry.op if entry is not None and entry.state == State.STARTED else "wait"
            why = exc.message.split(": ", 1)[-1]
            peer = exc.peer
            raise DistPeerLostError(
                f"{op}: rank {self.global_rank} stopped: {why}",
                rank=self.global_rank,
                op=op,
                peer=peer,
                caused_by=peer if isinstance(peer, int) else None,
            ) from None
        except DistError:
            # Store unreachable (its host may be the rank that died): ask less often.
            self._fail_store_ok_after = now + 2.0
            return
        raise self._reported(blob)

    def _reported(self, blob: bytes) -> DistError:
        info = _failure_record(blob)
        if info is None:
            err = DistError(
                f"rank {self.global_rank} stopped: the group's failure key 'failed' in the store "
                f"holds {len(blob)} bytes that are not a failure record; something other than "
                "this job's ranks wrote it",
                rank=self.global_rank,
                op="check_failed",
            )
            self._reported_error = err  # not re-published
            return err
        cls = _FAILURE_CLASSES.get(str(info.get("cls")), DistError)
        peer, culprit = info.get("peer"), info.get("rank")
        err = cls(
            f"rank {self.global_rank} stopped: rank {info.get('rank')} reported a failure "
            f"of this group: {info.get('msg')}",
            rank=self.global_rank,
            op=str(info.get("op")),
            peer=peer if isinstance(peer, (int, str, type(None))) else str(peer),
            caused_by=culprit if isinstance(culprit, int) else None,
        )
        self._reported_error = err  # not re-published
        return err

    def fail_from_elsewhere(self, err: DistError) -> None:
        """Fail this group with ``err``, found while this rank waited in another group
        (a wait cycle between the two: this group's op can never finish either)."""
        if self._failure is None:
            self._failure = err
            self._publish(err)

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

    def _culprit_of(self, exc: DistError) -> int:
        """The global rank whose failure ``exc`` follows: a dead or late peer, the rank
        that reported first, or this rank itself."""
        if isinstance(exc.caused_by, int):
            return exc.caused_by
        if isinstance(exc, (DistPeerLostError, DistTimeoutError)) and isinstance(exc.peer, int):
            return exc.peer
        return self.global_rank

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

    def issue_call(
        self,
        op: str,
        engine: Engine,
        call: CallDesc,
        action: Callable[[Any, CallDesc | None, int, float], Any],
        async_op: bool,
        timeout: float | None = None,
    ) -> Any:
        """Run collective ``action(engine, call, seq, deadline)`` once every rank agreed on
        ``call``, after every earlier operation; return a ``Work`` when async. The action
        passes its ``call`` argument (see ``agree``) on to the engine. ``timeout`` bounds
        this operation instead of the group's timeout."""
        job = _Job(engine, call, action, timeout=timeout)
        return self._enqueue(op, job, async_op, True)

    def submit(
        self,
        op: str,
        body: Callable[[float, int], list[Any] | None],
        async_op: bool,
        collective: bool = True,
        call: CallDesc | None = None,
    ) -> Any:
        """Run ``body(deadline, seq)`` after every earlier operation, without agreement
        (point-to-point and other non-collective steps); a ``Work`` when async."""
        job = _Job(None, call, lambda _engine, _call, seq, deadline: body(deadline, seq))
        return self._enqueue(op, job, async_op, collective, agree=False)

    def all_reduce_small(self, tensor: np.ndarray, op: Any) -> bool:
        """Run a small synchronous all-reduce of a numpy array in one compiled step when
        nothing else of this group is in flight; False (nothing done) when that road
        does not apply: the caller takes the general one.

        Same step, same mismatch check and same flight record as the general road
        (``transport/shm/_small``), minus its Python: the per-call work left here is
        a cache lookup, a lock, the C call and the flight record.
        """
        small = self._small
        if small is None or type(op) is not ReduceOp:  # other ops: the general road checks
            return False
        key = (tensor.shape, tensor.dtype, op)
        known = self._small_calls.get(key)
        if known is None:
            known = self._describe_small(tensor, op, small.op_codes)
            if len(self._small_calls) >= 256:
                self._small_calls.clear()
            self._small_calls[key] = known
        if known.op_code < 0:
            return False
        # Holding the lock keeps every other issuer out; an empty queue means no
        # earlier operation is pending, so this one is next in issue order.
        with self._cond_lock:
            if (
                self._next_ticket != self._running_ticket
                or self._failure is not None
                or self._closed
            ):
                return False
            verify = self.check_mismatch
            code = small.step(0, tensor, known.op_code, known.digest, verify)
            if code < 0:
                return False
            seq = next(self._seq)
            flight = self.flight
            e = flight.ring[seq & MASK]
            now = time.monotonic()
            e.seq, e.op, e.call, e.sync, e.t_enter = seq, "all_reduce", known.call, True, now
            flight.last_entered = seq
            if code == 0:
                e.state, e.t_end = State.COMPLETED, now  # microseconds after t_enter
                flight.last_completed = seq
                return True
            # A peer is not there yet: wait for it as the general road does.
            e.state = State.STARTED
            flight.running = seq
            try:
                small.finish(
                    code,
                    tensor,
                    known.op_code,
                    known.digest,
                    verify,
                    known.call,
                    now + self.timeout,
                )
            except BaseException as exc:
                err = self._fail(exc, seq)
                if err is exc:
                    raise
                raise err from None
            finally:
                if self._watch is not None and self._watch.posted:
                    self._watch.done()
                restore_slice()  # it waited for a peer: the caller's own slice back
            e.state, e.t_end = State.COMPLETED, time.monotonic()
            flight.last_completed = seq
            return True

    def _describe_small(
        self, tensor: np.ndarray, op: ReduceOp, codes: dict[ReduceOp, int]
    ) -> _SmallCall:
        # The general road's descriptor (collectives -> _call.issue), so digests agree.
        call = CallDesc(
            "all_reduce", tuple(tensor.shape), tensor.dtype.str, op.name, -1, self.group_key
        )
        return _SmallCall(codes.get(op, -1), call, digest(call))

    def submit_giving_way(
        self,
        op: str,
        step: Callable[[float, Callable[[], bool]], Any],
        async_op: bool = True,
        ready: Callable[[], bool] | None = None,
    ) -> Any:
        """Run ``step(deadline, give_way)`` after every earlier operation until it returns
        something other than ``GAVE_WAY``; a ``Work`` when async, else what it returned.
        A step returns ``GAVE_WAY`` when ``give_way()`` said other work was issued after
        it: it runs again behind that work. Each run gets the group timeout afresh, so
        the timeout bounds how long the step holds the group up, not how long a rank
        that keeps working leaves a receive posted (gloo counts from ``wait()``). A
        synchronous step runs on the caller's thread first, then, if it gave way, on the
        progress thread while the caller waits. ``ready()`` says whether the step,
        queued, would get anywhere if it ran now (a receive whose message is here);
        ``None``: it only waits.

        For waits that a later operation may be what ends: a receive waits for a send
        this rank (another thread) or its peer may issue only after it, and a send's
        verdict comes when the peer runs its matching receive.
        """

        def action(_engine: Any, _call: CallDesc | None, seq: int, deadline: float) -> Any:
            self._p2p_waiting = True
            try:
                return step(deadline, self._later_work_waiting)
            finally:
                self._p2p_waiting = False

        job = _Job(None, None, action, ready)
        if async_op:
            return self._enqueue(op, job, True, False, agree=False, gives_way=True)
        result = self._run_inline(op, job)
        if result is not GAVE_WAY:
            return result
        return self._enqueue(op, job, True, False, agree=False, gives_way=True).result()

    def _later_work_waiting(self) -> bool:
        """Whether work issued after the step running now could get somewhere: an
        operation other than a ``submit_giving_way`` step, or a step that is ready (a
        receive whose message arrived meanwhile). Called by that step, on its thread."""
        steps = list(self._giving_way.values())
        if self._next_ticket - self._running_ticket - 1 > len(steps):
            return True
        return any(job.ready is not None and job.ready() for job in steps)

    def _enqueue(
        self,
        op: str,
        job: _Job,
        async_op: bool,
        collective: bool,
        agree: bool = True,
        gives_way: bool = False,
    ) -> Any:
        """Take a ticket (and, for collectives, the next ``seq``: both under one lock, so
        the two orders agree when several threads issue), record the call, then run it
        here (synchronous) or on the progress thread (async)."""
        call = job.call
        if not agree:
            job = job._replace(call=None)
        step = job if gives_way else None
        if not async_op:
            # Synchronous: run on the caller's thread, no Work to build (its Event
            # costs microseconds a small all-reduce cannot spare).
            ticket, seq = self._take_ticket(op, collective, step)
            self._record(seq, op, call, True)
            self._execute(ticket, seq, job)
            return None
        # The queue must hold jobs in ticket order (the progress thread runs them as they
        # come and waits for each one's turn): ticket and put under one lock.
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._progress, name=f"distrib-progress-{self.global_ranks}", daemon=True
                )
                self._thread.start()
            ticket, seq = self._take_ticket(op, collective, step)
            self._record(seq, op, call, False)
            work = _Work(op, self.global_rank, self.flight, seq)
            self._queue.put((ticket, seq, job, work))
        return work

    def _record(self, seq: int, op: str, call: CallDesc | None, sync: bool) -> None:
        """Write collective ``seq``'s flight recorder slot (the hot path: kept short)."""
        if seq >= 0:
            flight = self.flight
            e = flight.ring[seq & MASK]
            e.seq, e.op, e.state, e.t_enter = seq, op, State.ENTERED, time.monotonic()
            e.call, e.sync = call, sync
            flight.last_entered = seq

    def _take_ticket(self, op: str, collective: bool, step: _Job | None) -> tuple[int, int]:
        """The next ticket (and ``seq`` for a collective), under one lock; ``step``, a job
        of ``submit_giving_way``, is recorded among the waiting steps until it runs."""
        if self._closed:
            raise self._closed_error(op)
        if self._failure is not None:
            raise self._failure
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            if step is not None:
                self._giving_way[ticket] = step
            elif self._p2p_waiting:  # a wait that may step aside for this: wake it
                try:
                    os.write(self._wake_w, b"\0")
                except OSError:  # the pipe is full (it is awake) or closed
                    pass
            return ticket, (next(self._seq) if collective else -1)

    def _run_inline(self, op: str, job: _Job) -> Any:
        """Run a giving-way ``job`` on the caller's thread in its turn; its result."""
        ticket, seq = self._take_ticket(op, False, job)
        return self._execute(ticket, seq, job)

    def _closed_error(self, op: str) -> DistClosedError:
        return DistClosedError(
            f"{op}: the process group of rank {self.global_rank} was destroyed",
            rank=self.global_rank,
            op=op,
        )

    def _run(self, ticket: int, seq: int, job: _Job, work: Work) -> None:
        try:
            result = self._execute(ticket, seq, job)
        except BaseException as exc:
            work._finish(exc)
            return
        if result is not GAVE_WAY:
            work._finish(None, result)
            return
        with self._cond:  # behind everything issued so far, in ticket order (_enqueue)
            ticket = self._next_ticket
            self._next_ticket += 1
            self._giving_way[ticket] = job
            self._queue.put((ticket, seq, job, work))

    def _execute(self, ticket: int, seq: int, job: _Job) -> Any:
        """Wait for ``ticket``'s turn, agree on the call, run it; a failure fails the group."""
        if self._running_ticket != ticket:  # an earlier (async) operation is still queued
            with self._cond:
                while self._running_ticket != ticket:
                    self._cond.wait(1.0)
        if self._giving_way:  # running now: no longer among the waiting steps
            self._giving_way.pop(ticket, None)
        try:
            if self._failure is not None:
                raise self._failure
            flight = self.flight
            if seq >= 0:
                flight.ring[seq & MASK].state = State.STARTED
                flight.running = seq
            deadline = time.monotonic() + (self.timeout if job.timeout is None else job.timeout)
            call = None
            if job.call is not None:
                call = self.agree(job.engine, job.call, seq, deadline)  # type: ignore[arg-type]
            result = job.action(job.engine, call, seq, deadline)
            if seq >= 0:
                e = flight.ring[seq & MASK]
                e.state, e.t_end = State.COMPLETED, time.monotonic()
                flight.last_completed = seq
            return result
        except (CallsDiffer, DistError) as exc:
            err = self._fail(exc, seq)
            if err is exc:
                raise
            raise err from None
        finally:
            if self._watch is not None and self._watch.posted:
                self._watch.done()
            with self._cond:
                self._running_ticket += 1
                self._cond.notify_all()
            restore_slice()  # a caller's thread that waited on a peer: its own slice back

    @property
    def failure(self) -> DistError | None:
        """The error that ended this group (its own or another rank's), if any."""
        return self._failure

    def _fail(self, exc: BaseException, seq: int) -> BaseException:
        """Make ``exc``, raised by operation ``seq``, the group's failure (published,
        the engine aborted); return what to raise. Other exceptions pass unchanged."""
        if isinstance(exc, CallsDiffer):
            # Every rank saw the same calls and raises by itself: aborting the engine
            # would only race the others out of their last step.
            err = mismatch_error(exc.calls, self._rank, self.global_ranks, seq, exc.op)
            if self._failure is None:
                self._failure = err
                self._publish(err)
            self.flight.failed(seq)
            return err
        if isinstance(exc, DistError):
            self.flight.failed(seq)
            if self._failure is None:
                self._failure = exc
                if exc is not self._reported_error:
                    self._publish(exc)
                # A mismatch (a wait cycle between groups, a point-to-point mismatch, or
                # one read from the published failure) is found by every rank involved or
                # read from the store: like CallsDiffer, aborting would only race them.
                if not isinstance(exc, DistMismatchError):
                    self.cpu_engine.abort(str(exc), self._culprit_of(exc), type(exc).__name__)
        return exc

    def _progress(self) -> None:
        keep_short_slice()  # woken by a peer, run now rather than after a compute slice
        while True:
            item = self._queue.get()
            if item is None:
                break
            self._run(*item)
            item = None  # idle: hold nothing of the last job (its buffers, its caller's)
        # A step that gave way after close() queued its end marker: never to run.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[3]._finish(self._closed_error(item[3].op))

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
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


def _forget_in_child() -> None:
    # Runs in every forked child: checking the pid on each call instead costs a
    # system call per collective.
    ProcessGroup.default = None


os.register_at_fork(after_in_child=_forget_in_child)
