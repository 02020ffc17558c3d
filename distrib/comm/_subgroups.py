"""Group queries and splits with torch's names: ranks of a group, rank translation, subgroups.

``new_subgroups`` and ``new_subgroups_by_enumeration`` are ``new_group`` in a
loop, so every rank of the world calls them, in the same order, like
``new_group``; a rank gets back the subgroup it belongs to and the list of all
(``GroupMember.NON_GROUP_MEMBER`` for the ones it is not in, as in torch).
"""

from __future__ import annotations

from typing import Any

from ._api import GroupMember, _no_options, _require, new_group
from ._call import resolve_group
from ._group import ProcessGroup

__all__ = [
    "get_global_rank",
    "get_group_rank",
    "get_pg_count",
    "get_process_group_ranks",
    "is_available",
    "new_subgroups",
    "new_subgroups_by_enumeration",
]


def is_available() -> bool:
    """True: distrib's collectives are always built in (torch's ``is_available``)."""
    return True


def _member_group(group: Any, op: str) -> ProcessGroup:
    pg = resolve_group(group, op)
    if pg is None:
        raise ValueError(f"{op}: this rank is not a member of the group (NON_GROUP_MEMBER)")
    return pg


def get_process_group_ranks(group: ProcessGroup | None) -> list[int]:
    """The global ranks of ``group`` in group-rank order (``None``: the default group)."""
    return list(_member_group(group, "get_process_group_ranks").global_ranks)


def get_global_rank(group: ProcessGroup, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group``; ValueError if it is not in it."""
    pg = _member_group(group, "get_global_rank")
    if not isinstance(group_rank, int) or not 0 <= group_rank < pg.size():
        raise ValueError(
            f"get_global_rank: group rank {group_rank!r} is not part of group {pg.global_ranks} "
            f"(group ranks are 0..{pg.size() - 1})"
        )
    return pg.global_ranks[group_rank]


def get_group_rank(group: ProcessGroup, global_rank: int) -> int:
    """The rank in ``group`` of ``global_rank``; ValueError if it is not in it."""
    pg = _member_group(group, "get_group_rank")
    try:
        return pg.global_ranks.index(global_rank)
    except ValueError:
        raise ValueError(
            f"get_group_rank: global rank {global_rank!r} is not part of group {pg.global_ranks}"
        ) from None


def get_pg_count() -> int:
    """Number of process groups this rank created: the default group plus subgroups."""
    world = _require("get_pg_count")
    return 1 + world.group_count


def new_subgroups_by_enumeration(
    ranks_per_subgroup_list: Any,
    timeout: Any = None,
    backend: Any = None,
    pg_options: Any = None,
    group_desc: Any = None,
) -> tuple[Any, list[Any]]:
    """One subgroup per list of global ranks; returns (this rank's subgroup or None, all).

    Every rank of the world calls it with the same lists; a rank may be in at most one.
    """
    _no_options("new_subgroups_by_enumeration", pg_options)
    lists = [list(r) for r in (ranks_per_subgroup_list or [])]
    if not lists:
        raise ValueError("new_subgroups_by_enumeration: ranks_per_subgroup_list is empty")
    seen: dict[int, int] = {}
    for i, ranks in enumerate(lists):
        for r in ranks:
            if r in seen:
                raise ValueError(
                    f"new_subgroups_by_enumeration: rank {r} is in subgroups {seen[r]} and {i}; "
                    "a rank can be in at most one"
                )
            seen[r] = i
    current, subgroups = None, []
    for ranks in lists:
        sub = new_group(ranks, timeout=timeout, backend=backend)
        subgroups.append(sub)
        if sub is not GroupMember.NON_GROUP_MEMBER:
            current = sub
    return current, subgroups


def new_subgroups(
    group_size: int | None = None,
    group: Any = None,
    timeout: Any = None,
    backend: Any = None,
    pg_options: Any = None,
    group_desc: Any = None,
) -> tuple[Any, list[Any]]:
    """Split ``group`` (default: the world) into consecutive subgroups of ``group_size`` ranks.

    ``group_size=None`` means the ranks of one host (torch: the GPUs of one machine).
    Returns (this rank's subgroup, all subgroups). Every rank of the world calls it.
    """
    _no_options("new_subgroups", pg_options)
    world = _require("new_subgroups")
    parent = world.group if group is None else group
    if not isinstance(parent, ProcessGroup):
        raise ValueError(
            "new_subgroups: group must be a ProcessGroup this rank belongs to or None, "
            f"got {parent!r}"
        )
    ranks = list(parent.global_ranks)
    if group_size is None:
        group_size = parent._ctx.host_ids.count(parent._ctx.host_ids[parent.rank()])
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"new_subgroups: group_size must be a positive int, got {group_size!r}")
    if group_size > len(ranks):
        raise ValueError(
            f"new_subgroups: group_size {group_size} exceeds the group's {len(ranks)} ranks"
        )
    if len(ranks) % group_size:
        raise ValueError(
            f"new_subgroups: the group's {len(ranks)} ranks are not divisible by "
            f"group_size {group_size}"
        )
    chunks = [ranks[i : i + group_size] for i in range(0, len(ranks), group_size)]
    return new_subgroups_by_enumeration(chunks, timeout=timeout, backend=backend)
