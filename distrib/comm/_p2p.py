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
from ._call import check_array, group_rank, resolve_group, shape_of, write_back
from ._group import ProcessGroup
from ._work import Work

__all__ = ["irecv", "isend", "recv", "send"]


class _Confirm:
    """Which send to confirm: filled in by the send body, read by the confirmation."""

    n = 0


class _Verdict(NamedTuple):
    """Two ways to wait for the receiver's verdict on a send: ``wait(deadline, seq)``
    blocks (a job of ``submit``); ``wait_or_give_way(deadline, give_way)`` steps aside
    for work issued later (a step of ``submit_giving_way``)."""

    wait: Callable[[float, int], None]
    wait_or_give_way: Callable[[float, Callable[[], bool]], bool]


def _p2p(
    pg: ProcessGroup, op: str, tensor: Any, peer: int, tag: int, sending: bool
) -> tuple[Callable[[float, int], list[Any]], _Verdict]:
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
    engine = pg.engine_for(tensor)
    call = CallDesc(
        "send" if sending else "recv", shape_of(tensor), tensor.dtype.str, group=pg.group_key
    )
    which = _Confirm()

    def body(deadline: float, seq: int) -> list[Any]:
        flat = tensor.ravel()
        if sending:
            engine.send(flat, peer_g, tag, deadline, call=call)
            which.n = engine.last_send(peer_g, tag)
        else:
            engine.recv(flat, peer_g, tag, deadline, call=call)
            write_back(tensor, flat)
        return [tensor]

    def confirm(deadline: float, seq: int) -> None:
        if which.n:
            engine.confirm_send(peer_g, tag, which.n, call, deadline)

    def confirm_or_give_way(deadline: float, give_way: Callable[[], bool]) -> bool:
        return not which.n or engine.confirm_send(peer_g, tag, which.n, call, deadline, give_way)

    return body, _Verdict(confirm, confirm_or_give_way)


class _SendWork(Work):
    """``isend``'s handle: it completes with the receiver's verdict. ``wait`` asks for the
    verdict on the caller's thread; a done callback (the torch backend's future) queues
    the question behind everything issued so far, so receives issued after the send still
    run first and a ring of sends and receives cannot wait on itself."""

    def __init__(self, inner: Work, pg: ProcessGroup, verdict: _Verdict) -> None:
        super().__init__(inner.op, pg.global_rank)
        self._inner, self._pg, self._verdict = inner, pg, verdict
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
                self._pg.submit(self.op, self._verdict.wait, False, False)
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
            # Queued now, perhaps before the receives issued next: it steps aside for them.
            verdict = self._pg.submit_giving_way(self.op, self._verdict.wait_or_give_way)
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


def send(tensor: Any, dst: int, group: Any = None, tag: int = 0) -> None:
    """Send ``tensor`` to rank ``dst`` (matched by ``recv`` with the same ``tag``); returns
    once the receiver accepted it."""
    pg = resolve_group(group, "send")
    if pg is not None:
        body, verdict = _p2p(pg, "send", tensor, dst, tag, True)
        pg.submit("send", body, False, False)
        pg.submit("send", verdict.wait, False, False)


def recv(tensor: Any, src: int, group: Any = None, tag: int = 0) -> int:
    """Receive into ``tensor`` from rank ``src``; returns ``src``."""
    pg = resolve_group(group, "recv")
    if pg is not None:
        pg.submit("recv", _p2p(pg, "recv", tensor, src, tag, False)[0], False, False)
    return src


def isend(tensor: Any, dst: int, group: Any = None, tag: int = 0) -> Any:
    """Asynchronous ``send``; returns a ``Work`` (``wait`` includes the receiver's verdict)."""
    pg = resolve_group(group, "isend")
    if pg is None:
        return None
    body, verdict = _p2p(pg, "isend", tensor, dst, tag, True)
    return _SendWork(pg.submit("isend", body, True, False), pg, verdict)


def irecv(tensor: Any, src: int, group: Any = None, tag: int = 0) -> Any:
    """Asynchronous ``recv``; returns a ``Work``."""
    pg = resolve_group(group, "irecv")
    return (
        None
        if pg is None
        else pg.submit("irecv", _p2p(pg, "irecv", tensor, src, tag, False)[0], True, False)
    )
