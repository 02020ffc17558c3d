"""Process-group management (torch's names): init, query, subgroups, destroy.

The default group is the one piece of process-wide state distrib keeps; it
records its pid so a forked child does not mistake its parent's group for
its own.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._config import config
from .._errors import DistUsageError
from ..store import PrefixStore, Store, to_seconds
from ..store._leave import leave
from ..store._rendezvous import rendezvous
from ._call import resolve_group
from ._group import NON_GROUP_MEMBER, ProcessGroup

__all__ = [
    "Backend",
    "GroupMember",
    "destroy_process_group",
    "get_backend",
    "get_rank",
    "get_world_size",
    "group",
    "init_process_group",
    "is_initialized",
    "new_group",
    "resolve_group",
]

DEFAULT_TIMEOUT_S = 600.0  # 10 minutes, like torch's default for gloo


class Backend:
    """Backend names ``init_process_group`` accepts (torch's ``Backend``)."""

    AUTO = "auto"
    CPU = "cpu"
    ZMQ = "zmq"
    GLOO = "gloo"  # alias of the CPU path, so torch scripts run unchanged
    NCCL = "nccl"  # cupy arrays go to the GPU engine (numpy still uses the CPU path)
    ALL = ("auto", "cpu", "zmq", "gloo", "nccl")


class _WorldMeta(type):
    """Gives a class torch's ``WORLD`` attribute: the default group (``None`` before init)."""

    @property
    def WORLD(cls) -> ProcessGroup | None:
        world = _current()
        return None if world is None else world.group


class GroupMember(metaclass=_WorldMeta):
    """``GroupMember.WORLD`` is the default group; ``GroupMember.NON_GROUP_MEMBER`` is what
    ``new_group`` returns to non-members (torch's ``GroupMember``)."""

    NON_GROUP_MEMBER = NON_GROUP_MEMBER


class group(metaclass=_WorldMeta):  # torch's name
    """``group.WORLD`` is the default process group (torch's ``group``)."""


@dataclass
class _World:
    group: ProcessGroup
    store: Store
    owns_store: bool
    bind_host: str
    transport: str
    pid: int
    subgroups: list[ProcessGroup] = field(default_factory=list)
    group_count: int = 0
    # new_group(use_local_synchronization=True): groups made so far per member list
    local_groups: dict[tuple[int, ...], int] = field(default_factory=dict)


_world: _World | None = None  # the default process group (the one allowed global)


def _current() -> _World | None:
    if _world is not None and _world.pid != os.getpid():
        return None  # inherited through fork: not ours
    return _world


def _leave(world: _World | None, at_exit: bool = False) -> None:
    """After a clean run, leave the job's own store in order: rank 0, hosting it, last
    (and, unless the process is exiting, see it close: it may join a new group next)."""
    if world is not None and world.owns_store and world.group.failure is None:
        leave(world.store, world.group.size(), await_close=not at_exit)


# A default group still up at interpreter exit (no destroy_process_group) leaves too.
atexit.register(lambda: _leave(_current(), at_exit=True))


def _require(op: str) -> _World:
    world = _current()
    if world is None:
        raise DistUsageError(
            f"{op}: the default process group is not initialized; call "
            "distrib.init_process_group() first",
            op=op,
        )
    return world


def _rank_number(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(rank)
    return int(rank)


def _no_options(op: str, pg_options: Any) -> None:
    if pg_options is not None:
        raise DistUsageError(
            f"{op}: pg_options={pg_options!r} is not supported; distrib's backends take no "
            "options (pass None)",
            op=op,
        )


def _backend_name(backend: Any) -> str:
    name = str(backend).lower() if backend is not None else "auto"
    parts = [p.split(":")[-1] for p in name.split(",")]  # "cpu:gloo,cuda:nccl"
    for part in parts:
        if part not in Backend.ALL:
            raise DistUsageError(
                f"init_process_group: unknown backend {backend!r}; expected one of "
                + ", ".join(Backend.ALL),
                op="init_process_group",
            )
    return name


def _transport(backend: str) -> str:
    chosen = config().transport or "auto"
    if backend in ("zmq", "cpu") and chosen == "auto":
        return "zmq"
    return chosen


def _timeout(timeout: Any) -> float:
    if timeout is not None:
        return to_seconds(timeout)
    return config().timeout or DEFAULT_TIMEOUT_S


def init_process_group(
    backend: str | None = None,
    init_method: str | None = None,
    timeout: Any = None,
    world_size: int | None = -1,
    rank: int | None = -1,
    store: Store | None = None,
    group_name: str = "",
    pg_options: Any = None,
    device_id: Any = None,
) -> None:
    """Join the default process group (torch's ``init_process_group``, same parameters).

    Args:
        backend: None or "auto" (default), "cpu"/"zmq", "gloo" (alias of the CPU path)
            or "nccl".
        init_method: "env://" (default: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE, or
            Slurm / Open MPI / MPICH variables), "tcp://host:port" or "file://path".
        timeout: ``timedelta`` or seconds for every collective (default DISTRIB_TIMEOUT
            or 10 minutes).
        world_size, rank: override the environment (-1 or None: read it from there).
        store: an existing store (then ``rank`` and ``world_size`` are required).
        pg_options: backend options of torch's C++ backends; distrib has none, so only
            None is accepted.
        device_id: accepted and unused: arrays choose their engine (numpy: CPU,
            cupy: the array's own GPU), so there is no device to bind eagerly.
    """
    global _world
    if _current() is not None:
        raise DistUsageError(
            "init_process_group: the default process group is already initialized; call "
            "destroy_process_group() first",
            op="init_process_group",
        )
    _no_options("init_process_group", pg_options)
    rank = None if rank == -1 else rank
    world_size = None if world_size == -1 else world_size
    name = _backend_name(backend)
    seconds = _timeout(timeout)
    if store is not None:
        if rank is None or world_size is None:
            raise DistUsageError(
                "init_process_group: store= needs rank= and world_size=", op="init_process_group"
            )
        if not 0 <= rank < world_size:
            raise DistUsageError(
                f"init_process_group: rank {rank} is outside 0..{world_size - 1}",
                op="init_process_group",
            )
        base, owns, bind_host = store, False, "127.0.0.1"
        store_host = getattr(store, "host", None)
        if store_host and not str(store_host).startswith("127."):
            from ..store._rendezvous import _bind_host_towards

            bind_host = _bind_host_towards(store_host, getattr(store, "port", 0))
    else:
        rdzv = rendezvous(init_method, rank, world_size, seconds)
        base, owns, bind_host = rdzv.store, rdzv.owns_store, rdzv.bind_host
        rank, world_size = rdzv.rank, rdzv.world_size
    transport = _transport(name)
    try:
        group = ProcessGroup(
            PrefixStore(f"distrib/pg{group_name}/default", base),
            rank,
            world_size,
            list(range(world_size)),
            seconds,
            name,
            bind_host,
            transport,
        )
    except BaseException:
        if owns:
            base.close()
        raise
    _world = _World(group, base, owns, bind_host, transport, os.getpid())
    ProcessGroup.default = group


def is_initialized() -> bool:
    """True when this process has joined the default group."""
    return _current() is not None


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default: the world); -1 if not a member."""
    pg = resolve_group(group, "get_rank")
    return -1 if pg is None else pg.rank()


def get_world_size(group: Any = None) -> int:
    """Number of ranks in ``group`` (default: the world); -1 if not a member."""
    pg = resolve_group(group, "get_world_size")
    return -1 if pg is None else pg.size()


def get_backend(group: Any = None) -> str:
    """The backend name the group was created with."""
    pg = resolve_group(group, "get_backend")
    if pg is None:
        raise DistUsageError(
            "get_backend: this rank is not a member of the group", op="get_backend"
        )
    return pg.backend


def new_group(
    ranks: Any = None,
    timeout: Any = None,
    backend: str | None = None,
    pg_options: Any = None,
    use_local_synchronization: bool = False,
    group_desc: str | None = None,
    device_id: Any = None,
    sort_ranks: bool = True,
) -> Any:
    """Create a subgroup of ``ranks`` (global ranks; default all); non-members get
    ``GroupMember.NON_GROUP_MEMBER``.

    As in torch: every rank of the world calls ``new_group`` in the same order, or,
    with ``use_local_synchronization=True``, only the members do (in the same order
    among themselves); group rank i is the i-th smallest of ``ranks``, or with
    ``sort_ranks=False`` ``ranks[i]``. ``pg_options`` must be None (distrib's
    backends take no options), ``device_id`` is unused (arrays choose their engine)
    and ``group_desc`` is accepted."""
    world = _require("new_group")
    _no_options("new_group", pg_options)
    size = world.group.size()
    if ranks is None:
        members = list(range(size))
    else:
        try:
            members = [_rank_number(r) for r in ranks]
        except TypeError:
            raise DistUsageError(
                f"new_group: ranks must be a list of int ranks, got {ranks!r}", op="new_group"
            ) from None
        if sort_ranks:
            members.sort()
    if len(set(members)) != len(members) or not members:
        raise DistUsageError(
            f"new_group: ranks must be distinct and non-empty, got {ranks!r}", op="new_group"
        )
    bad = [r for r in members if not 0 <= r < size]
    if bad:
        raise DistUsageError(
            f"new_group: ranks {bad} are outside the world 0..{size - 1}", op="new_group"
        )
    me = world.group.rank()
    if use_local_synchronization:
        if me not in members:
            return GroupMember.NON_GROUP_MEMBER  # nothing to meet: the members meet alone
        # Only the members count their calls: the store prefix names the member list
        # and how many groups of exactly these members (in this order) came before.
        key = tuple(members)
        world.local_groups[key] = world.local_groups.get(key, 0) + 1
        prefix = f"distrib/pg/local/{'-'.join(map(str, key))}/{world.local_groups[key]}"
    else:
        world.group_count += 1  # identical on every rank: all ranks call new_group in order
        if me not in members:
            return GroupMember.NON_GROUP_MEMBER
        prefix = f"distrib/pg/sub{world.group_count}"
    name = _backend_name(backend) if backend is not None else world.group.backend
    group = ProcessGroup(
        PrefixStore(prefix, world.store),
        members.index(me),
        len(members),
        members,
        _timeout(timeout) if timeout is not None else world.group.timeout,
        name,
        world.bind_host,
        world.transport,
    )
    world.subgroups.append(group)
    return group


def destroy_process_group(group: Any = None) -> None:
    """Tear down ``group``, or (default) every group and the default group's store."""
    global _world
    world = _current()
    if group is not None and group is not GroupMember.NON_GROUP_MEMBER:
        group.close()
        if world is not None and group in world.subgroups:
            world.subgroups.remove(group)
        if world is None or group is not world.group:
            return
    if world is None:
        _world = None
        ProcessGroup.default = None
        return
    for sub in world.subgroups:
        sub.close()
    world.group.close()
    _leave(world)
    if world.owns_store:
        world.store.close()
    _world = None
    ProcessGroup.default = None
