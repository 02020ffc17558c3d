"""``P2POp`` and ``batch_isend_irecv``: a list of sends and receives issued together.

The group's progress thread runs operations one at a time, so the sends of the
batch are issued first and the receives after them: a send completes once its
data is handed to the transport (it does not wait for the matching receive),
and receives match by peer and tag, so a batch listed in any order on any rank
completes, as torch promises (ring exchanges, halo swaps). The returned
``Work`` handles are in the order of the list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._call import resolve_group
from ._p2p import irecv, isend
from ._subgroups import get_global_rank
from ._work import Work

__all__ = ["P2POp", "batch_isend_irecv"]


def _torch_p2p(name: str) -> Any:
    # torch.distributed.isend/irecv are accepted too, for code written for torch.
    import sys

    dist = sys.modules.get("torch.distributed")
    return getattr(dist, name, None) if dist is not None else None


class P2POp:
    """One point-to-point operation for ``batch_isend_irecv`` (torch's ``P2POp``).

    Args:
        op: ``isend`` or ``irecv`` (distrib's or torch.distributed's).
        tensor: the array to send, or to receive into.
        peer: the peer's global rank (or give ``group_peer``, its rank in ``group``).
        group: the process group (default: the world).
        tag: matched between the send and the receive.
    """

    def __init__(
        self,
        op: Callable[..., Any],
        tensor: Any,
        peer: int | None = None,
        group: Any = None,
        tag: int = 0,
        group_peer: int | None = None,
    ) -> None:
        if op in (isend, _torch_p2p("isend")) and op is not None:
            self.sending = True
        elif op in (irecv, _torch_p2p("irecv")) and op is not None:
            self.sending = False
        else:
            raise ValueError(
                "P2POp: op must be distrib.isend or distrib.irecv (or torch.distributed's), "
                f"got {op!r}"
            )
        if (peer is None) == (group_peer is None):
            raise ValueError("P2POp: give exactly one of peer (global rank) and group_peer")
        self.op, self.tensor, self.group, self.tag = op, tensor, group, tag
        self.peer, self.group_peer = peer, group_peer

    def __repr__(self) -> str:
        kind = "isend" if self.sending else "irecv"
        return f"P2POp({kind}, peer={self.peer}, group_peer={self.group_peer}, tag={self.tag})"


def batch_isend_irecv(p2p_op_list: list[P2POp]) -> list[Work]:
    """Issue every op of ``p2p_op_list``; returns their ``Work`` handles, in order.

    All ops must use the same group (as in torch). A rank outside that group
    gets an empty list.
    """
    if not isinstance(p2p_op_list, list) or not p2p_op_list:
        raise ValueError("batch_isend_irecv: p2p_op_list must be a non-empty list of P2POp")
    bad = [p for p in p2p_op_list if not isinstance(p, P2POp)]
    if bad:
        raise TypeError(f"batch_isend_irecv: every item must be a P2POp, got {bad[0]!r}")
    group = p2p_op_list[0].group
    if any(p.group is not group for p in p2p_op_list):
        raise ValueError("batch_isend_irecv: all ops need to use the same group")
    pg = resolve_group(group, "batch_isend_irecv")
    if pg is None:
        return []
    works: dict[int, Work] = {}
    sends_first = sorted(range(len(p2p_op_list)), key=lambda i: not p2p_op_list[i].sending)
    for i in sends_first:
        p = p2p_op_list[i]
        peer = p.peer if p.group_peer is None else get_global_rank(pg, int(p.group_peer))
        assert peer is not None  # P2POp checked that one of the two is given
        works[i] = (isend if p.sending else irecv)(p.tensor, peer, group, p.tag)
    return [works[i] for i in range(len(p2p_op_list))]
