"""Point-to-point: ``send``, ``recv`` and their asynchronous forms, torch's names.

Each message carries the sender's ``CallDesc`` (shape, dtype); the receiver
compares it with its own before writing a byte and answers, so a mismatched
pair raises ``DistMismatchError`` on both ends: ``send`` (and ``isend``'s
``Work.wait``) waits for that answer, like a synchronous send in gloo or MPI.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from .._errors import DistUsageError
from ..transport._calldesc import CallDesc
from ..transport._engine import Engine
from ._call import check_array, group_rank, named_rank, resolve_group, shape_of, write_back
from ._group import GAVE_WAY, ProcessGroup
from ._work import Work

__all__ = ["irecv", "isend", "recv", "send", "source_rank"]


class _Confirm:
    """Which send to confirm: filled in by the send body, read by the confirmation."""

    n = 0


class _SendSteps(NamedTuple):
    """A send: ``body(deadline, seq)`` hands the data to the transport (a job of
    ``submit``); ``verdict(deadline, give_way)`` waits for the receiver's answer, or
    steps aside for work issued later (a step of ``submit_giving_way``)."""

    body: Callable[[float, int], list[Any]]
    verdict: Callable[[float, Callable[[], bool]], Any]
    verdict_here: Callable[[], bool]  # the verdict came: the verdict step would finish


def _checked(
    pg: ProcessGroup, op: str, tensor: Any, peer: int, tag: int, sending: bool
) -> tuple[int, Engine, CallDesc]:
    """The peer's group rank, the engine and the call descriptor, once the arguments
    are checked."""
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise TypeError(f"{op}: tag must be an int, got {tag!r}")
    check_array(pg, tensor, "tensor", op, writable=not sending)
    arg = "dst" if sending else "src"
    peer_g = group_rank(pg, peer, arg, op)
    if peer_g == pg.rank():
        raise DistUsageError(
            f"{op}: rank {pg.global_rank} cannot {'send to' if sending else 'receive from'} itself",
            rank=pg.global_rank,
            op=op,
            peer=peer,
        )
    call = CallDesc(
        "send" if sending else "recv", shape_of(tensor), tensor.dtype.str, group=pg.group_key
    )
    return peer_g, pg.engine_for(tensor), call


def _send_steps(pg: ProcessGroup, op: str, tensor: Any, dst: int, tag: int) -> _SendSteps:
    peer_g, engine, call = _checked(pg, op, tensor, dst, tag, True)
    which = _Confirm()

    def body(deadline: float, seq: int) -> list[Any]:
        engine.send(tensor.ravel(), peer_g, tag, deadline, call=call)
        which.n = engine.last_send(peer_g, tag)
        return [tensor]

    def verdict(deadline: float, give_way: Callable[[], bool]) -> Any:
        if not which.n or engine.confirm_send(peer_g, tag, which.n, call, deadline, give_way):
            return None
        return GAVE_WAY

    def verdict_here() -> bool:  # asked by the step running now: never reads the network
        return not which.n or engine.has_verdict(peer_g, tag, which.n)

    return _SendSteps(body, verdict, verdict_here)


def _receive(pg: ProcessGroup, op: str, tensor: Any, src: int, tag: int, async_op: bool) -> Any:
    """Post a receive; it waits for its message without holding up work issued after
    it (a send of this rank, from another thread or later in a batch, may be what its
    peer waits for before sending), and takes messages in post order."""
    peer_g, engine, call = _checked(pg, op, tensor, src, tag, False)
    order = pg.receive_order
    token = order.post(peer_g, tag)

    def step(deadline: float, give_way: Callable[[], bool]) -> Any:
        if not order.is_next(peer_g, tag, token):
            # An earlier receive takes the next message: it is queued or running, and
            # bounded by its own timeout.
            return GAVE_WAY
        try:
            if not engine.await_p2p(peer_g, tag, deadline, give_way):
                return GAVE_WAY  # still first in line when it runs again
            flat = tensor.ravel()
            engine.recv(flat, peer_g, tag, deadline, call=call)
            write_back(tensor, flat)
        except BaseException:
            order.done(peer_g, tag, token)
            raise
        order.done(peer_g, tag, token)
        return [tensor]

    def ready() -> bool:  # asked by the step running now: never reads the network
        return order.is_next(peer_g, tag, token) and engine.has_p2p(peer_g, tag)

    try:
        return pg.submit_giving_way(op, step, async_op, ready)
    except BaseException:
        order.done(peer_g, tag, token)
        raise


class _SendWork(Work):
    """``isend``'s handle: it completes with the receiver's verdict. ``wait`` asks for the
    verdict on the caller's thread; a done callback (the torch backend's future) queues
    the question behind everything issued so far. Either way the wait steps aside for
    work issued later, so a ring of sends and receives cannot wait on itself."""

    def __init__(self, inner: Work, pg: ProcessGroup, steps: _SendSteps) -> None:
        super().__init__(inner.op, pg.global_rank)
        self._inner, self._pg, self._steps = inner, pg, steps
        self._asked = False  # the verdict was asked for (once, by whichever path is first)
        self._asked_lock = threading.Lock()
        inner.add_done_callback(self._on_sent)

    def _ask(self) -> bool:
        with self._asked_lock:
            asked, self._asked = self._asked, True
        return not asked

    def _on_sent(self, inner: Work) -> None:
        exc = inner.exception()
        if exc is not None and self._ask():
            self._finish(exc)

    def wait(self, timeout: float | None = None) -> bool:
        self._inner.wait(timeout)
        if self._ask():
            try:
                steps = self._steps
                self._pg.submit_giving_way(self.op, steps.verdict, False, steps.verdict_here)
            except BaseException as exc:
                self._finish(exc)
                raise
            self._finish(None, self._inner.result())
        return super().wait(timeout)

    def add_done_callback(self, fn: Callable[[Work], None]) -> None:
        super().add_done_callback(fn)
        self._inner.add_done_callback(self._ask_queued)

    def _ask_queued(self, inner: Work) -> None:
        if inner.exception() is not None or not self._ask():
            return  # _on_sent finished this handle, or the verdict is already asked for
        try:
            steps = self._steps
            verdict = self._pg.submit_giving_way(self.op, steps.verdict, True, steps.verdict_here)
        except BaseException as exc:  # the group failed or closed meanwhile
            self._finish(exc)
            return
        sent = inner.result()
        verdict.add_done_callback(
            lambda v: self._finish(v.exception(), None if v.exception() else sent)
        )

    def is_completed(self) -> bool:
        return self._done.is_set() or (not self._asked and self._inner.is_completed())

    def is_success(self) -> bool:
        return super().is_success() or (not self._asked and self._inner.is_success())

    def exception(self) -> BaseException | None:
        return self._exc if self._done.is_set() else self._inner.exception()


def source_rank(pg: ProcessGroup, op: str, src: Any, group_src: Any) -> int:
    """The global rank a receive names; receiving from any source is refused by name."""
    if src is None and group_src is None:
        raise DistUsageError(
            f"{op}: receiving from any source (src=None) is not supported on rank "
            f"{pg.global_rank}; give src (a global rank) or group_src (a rank in the group)",
            rank=pg.global_rank,
            op=op,
        )
    return named_rank(pg, op, "src", src, group_src)


def send(
    tensor: Any,
    dst: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_dst: int | None = None,
) -> None:
    """Send ``tensor`` to rank ``dst`` (``group_dst`` within ``group``), matched by ``recv``
    with the same ``tag``; returns once the receiver accepted it."""
    pg = resolve_group(group, "send")
    if pg is not None:
        dst = named_rank(pg, "send", "dst", dst, group_dst)
        steps = _send_steps(pg, "send", tensor, dst, tag)
        pg.submit("send", steps.body, False, False)
        pg.submit_giving_way("send", steps.verdict, False, steps.verdict_here)


def recv(
    tensor: Any,
    src: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_src: int | None = None,
) -> int:
    """Receive into ``tensor`` from rank ``src`` (``group_src`` within ``group``); returns
    the sender's global rank (-1 on a rank outside ``group``, as torch does)."""
    pg = resolve_group(group, "recv")
    if pg is None:
        return -1
    src = source_rank(pg, "recv", src, group_src)
    _receive(pg, "recv", tensor, src, tag, False)
    return src


def isend(
    tensor: Any,
    dst: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_dst: int | None = None,
) -> Any:
    """Asynchronous ``send``; returns a ``Work`` (``wait`` includes the receiver's verdict)."""
    pg = resolve_group(group, "isend")
    if pg is None:
        return None
    dst = named_rank(pg, "isend", "dst", dst, group_dst)
    steps = _send_steps(pg, "isend", tensor, dst, tag)
    return _SendWork(pg.submit("isend", steps.body, True, False), pg, steps)


def irecv(
    tensor: Any,
    src: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_src: int | None = None,
) -> Any:
    """Asynchronous ``recv``; returns a ``Work``. It may be posted before the matching
    send is issued, on this rank or its peer."""
    pg = resolve_group(group, "irecv")
    if pg is None:
        return None
    return _receive(pg, "irecv", tensor, source_rank(pg, "irecv", src, group_src), tag, True)
