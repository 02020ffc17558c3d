"""Point-to-point: ``send``, ``recv`` and their asynchronous forms, torch's names."""

from __future__ import annotations

from typing import Any

from .._errors import DistUsageError
from ._api import resolve_group
from ._call import check_array, flat_view, group_rank, write_back
from ._group import ProcessGroup

__all__ = ["irecv", "isend", "recv", "send"]


def _p2p(pg: ProcessGroup, op: str, tensor: Any, peer: int, tag: int, sending: bool) -> Any:
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

    def body(deadline: float, seq: int) -> list[Any]:
        flat = flat_view(tensor)
        if sending:
            engine.send(flat, peer_g, tag, deadline)
        else:
            engine.recv(flat, peer_g, tag, deadline)
            write_back(tensor, flat)
        return [tensor]

    return body


def send(tensor: Any, dst: int, group: Any = None, tag: int = 0) -> None:
    """Send ``tensor`` to rank ``dst`` (matched by ``recv`` with the same ``tag``)."""
    pg = resolve_group(group, "send")
    if pg is not None:
        pg.submit("send", _p2p(pg, "send", tensor, dst, tag, True), False, False)


def recv(tensor: Any, src: int, group: Any = None, tag: int = 0) -> int:
    """Receive into ``tensor`` from rank ``src``; returns ``src``."""
    pg = resolve_group(group, "recv")
    if pg is not None:
        pg.submit("recv", _p2p(pg, "recv", tensor, src, tag, False), False, False)
    return src


def isend(tensor: Any, dst: int, group: Any = None, tag: int = 0) -> Any:
    """Asynchronous ``send``; returns a ``Work``."""
    pg = resolve_group(group, "isend")
    return (
        None
        if pg is None
        else pg.submit("isend", _p2p(pg, "isend", tensor, dst, tag, True), True, False)
    )


def irecv(tensor: Any, src: int, group: Any = None, tag: int = 0) -> Any:
    """Asynchronous ``recv``; returns a ``Work``."""
    pg = resolve_group(group, "irecv")
    return (
        None
        if pg is None
        else pg.submit("irecv", _p2p(pg, "irecv", tensor, src, tag, False), True, False)
    )
