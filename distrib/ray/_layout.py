"""Which rank each Ray actor becomes: ranks are contiguous per Ray node.

Actors come back from the placement group in bundle order; ranks group them by
Ray node id (not hostname: two Ray nodes may share a machine), nodes in order
of their first bundle, so that ``LOCAL_RANK``/``GROUP_RANK`` mean what they mean
under ``distrib-run`` and torchrun.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ActorInfo", "RankSlot", "assign_ranks"]


@dataclass(frozen=True)
class ActorInfo:
    """Where one actor landed (reported by the actor itself)."""

    node_id: str  # Ray's node id (hex)
    node_ip: str  # the address other nodes reach this node at
    hostname: str
    pid: int  # the actor's process


@dataclass(frozen=True)
class RankSlot:
    """One rank's place in the job."""

    rank: int
    local_rank: int
    local_world_size: int
    group_rank: int  # node index
    group_world_size: int  # number of nodes
    actor: int  # index of the actor (bundle) that runs this rank


def assign_ranks(infos: list[ActorInfo]) -> list[RankSlot]:
    """Slots in rank order for actors ``infos`` (bundle order)."""
    nodes: dict[str, list[int]] = {}
    for i, info in enumerate(infos):
        nodes.setdefault(info.node_id, []).append(i)
    slots: list[RankSlot] = []
    for group_rank, members in enumerate(nodes.values()):
        for local_rank, actor in enumerate(members):
            slots.append(
                RankSlot(
                    rank=len(slots),
                    local_rank=local_rank,
                    local_world_size=len(members),
                    group_rank=group_rank,
                    group_world_size=len(nodes),
                    actor=actor,
                )
            )
    return slots
