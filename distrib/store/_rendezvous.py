"""Turn ``init_process_group``'s arguments into (store, rank, world size, bind host).

``env://`` reads torch's ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``;
without ``RANK``/``WORLD_SIZE`` it falls back to Slurm (``SLURM_PROCID``,
``SLURM_NTASKS``), Open MPI (``OMPI_COMM_WORLD_RANK``/``SIZE``) and MPICH/PMI
(``PMI_RANK``/``PMI_SIZE``). ``tcp://host:port`` names the store directly and
``file://path`` uses a ``FileStore``. Rank 0 hosts the TCP store, except under
``distrib-run``: its workers (the launcher's direct children) use the store the
launcher hosts (``DISTRIB_STORE_ADDR``), with one key prefix per attempt, so the
store outlives rank 0 and survivors can still read why the job failed.
torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``), where every rank is a client
of the agent's c10d store at ``MASTER_ADDR:MASTER_PORT``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import msgpack

from .._config import config
from .._errors import DistError, DistTimeoutError, DistUsageError
from ._base import PrefixStore, Store
from ._client import TCPStore
from ._file_store import FileStore
from ._torch_store import torchelastic_store

__all__ = ["Rendezvous", "check_world", "local_rank_from_env", "rendezvous"]

_VIEW = "distrib/world/view/"  # + rank: that rank's {world_size, host, pid}
_JOINS = "distrib/world/joins/"  # + rank: how many processes claimed that rank
_VERDICT = "distrib/world/verdict"  # rank 0's judgement: "" when consistent, else why
_READ = "distrib/world/verdict_read"  # how many ranks have read a failing verdict
_READ_GRACE_S = 5.0  # a rank may still be starting (loaded machine)
_POLL_S = 0.02

_LAUNCHERS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


@dataclass
class Rendezvous:
    store: Store
    rank: int
    world_size: int
    bind_host: str
    owns_store: bool


def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise DistUsageError(
            f"init_process_group: environment variable {name}={raw!r} is not an integer",
            op="init_process_group",
        ) from None


def rank_and_size_from_env(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(rank, world size) from the first launcher whose variables are set."""
    for rank_var, size_var, _ in _LAUNCHERS:
        if rank_var in env or size_var in env:
            rank = _env_int(env, rank_var) if rank_var in env else None
            size = _env_int(env, size_var) if size_var in env else None
            return rank, size
    return None, None


def local_rank_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """The local rank set by torchrun/distrib-run, Slurm, Open MPI or MPICH, if any."""
    env = os.environ if env is None else env
    for _, _, local_var in _LAUNCHERS:
        if local_var in env:
            return _env_int(env, local_var)
    return None


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    if not isinstance(world_size, int) or world_size < 1:
        raise DistUsageError(
            f"init_process_group: world_size must be a positive int, got {world_size!r} "
            "(pass world_size= or set WORLD_SIZE)",
            op="init_process_group",
        )
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DistUsageError(
            f"init_process_group: rank must be an int in 0..{world_size - 1}, got {rank!r} "
            "(pass rank= or set RANK)",
            op="init_process_group",
        )
    return rank, world_size


def _bind_host_towards(master: str, port: int) -> str:
    """The local address that routes to the master (no packet is sent)."""
    try:
        ip = socket.gethostbyname(master)
    except OSError:
        raise DistUsageError(
            f"init_process_group: cannot resolve MASTER_ADDR {master!r}", op="init_process_group"
        ) from None
    if ip.startswith("127."):
        return ip
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, port or 9))
            return s.getsockname()[0]
    except OSError:
        return ip


def rendezvous(
    init_method: str | None,
    rank: int | None,
    world_size: int | None,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> Rendezvous:
    """Resolve the rendezvous described by ``init_method`` and the environment."""
    env = os.environ if env is None else env
    url = init_method or "env://"
    parsed = urlparse(url)
    env_rank, env_size = rank_and_size_from_env(env)
    rank = env_rank if rank is None else rank
    world_size = env_size if world_size is None else world_size
    if parsed.scheme == "file":
        rank, world_size = _check_rank(rank, world_size)
        path = parsed.path or parsed.netloc
        return Rendezvous(
            FileStore(path, world_size, timeout=timeout), rank, world_size, "127.0.0.1", True
        )
    if parsed.scheme == "tcp":
        host, port = parsed.hostname, parsed.port
        if not host or port is None:
            raise DistUsageError(
                f"init_process_group: init_method {url!r} must look like tcp://host:port",
                op="init_process_group",
            )
    elif parsed.scheme == "env":
        host, port_raw = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        if world_size is None:
            world_size = 1 if rank in (None, 0) else None
        rank = 0 if rank is None and world_size == 1 else rank
        if host is None or port_raw is None:
            if world_size == 1:
                host, port_raw = "127.0.0.1", "0"  # a private store for a one-rank job
            else:
                raise DistUsageError(
                    "init_process_group: env:// needs MASTER_ADDR and MASTER_PORT "
                    f"(world_size={world_size}, rank={rank}); set them or pass init_method="
                    "'tcp://host:port' or store=",
                    op="init_process_group",
                )
        try:
            port = int(port_raw)
        except ValueError:
            raise DistUsageError(
                f"init_process_group: MASTER_PORT={port_raw!r} is not an integer",
                op="init_process_group",
            ) from None
    else:
        raise DistUsageError(
            f"init_process_group: unsupported init_method {url!r}; use env://, "
            "tcp://host:port or file://path",
            op="init_process_group",
        )
    rank, world_size = _check_rank(rank, world_size)
    bind_host = _bind_host_towards(host, port)
    if parsed.scheme == "env":
        # Under torchrun its agent serves MASTER_PORT: be its client. Under distrib-run,
        # the launcher's store (it outlives rank 0).
        agent = torchelastic_store(env, socket.gethostbyname(host), port, timeout)
        if agent is None:
            agent = _launcher_store(timeout)
        if agent is not None:
            return _checked(agent, rank, world_size, bind_host, timeout)
    is_master = rank == 0
    store = TCPStore(
        socket.gethostbyname(host),
        port,
        world_size,
        is_master=is_master,
        timeout=timeout,
        wait_for_workers=False,
    )
    if not is_master:
        store.hosted_by = "rank 0"  # named if the connection drops: rank 0 died
    return _checked(store, rank, world_size, bind_host, timeout)


def _checked(
    store: Store, rank: int, world_size: int, bind_host: str, timeout: float
) -> Rendezvous:
    """``store``'s rendezvous once every rank agrees on the world (closed if not)."""
    try:
        check_world(store, rank, world_size, timeout)
    except BaseException:
        store.close()
        raise
    return Rendezvous(store, rank, world_size, bind_host, True)


def _view(raw: bytes | None) -> dict[str, Any]:
    """A published view (empty when missing or garbled)."""
    if raw is None:
        return {}
    try:
        doc = msgpack.unpackb(raw, raw=False)
    except Exception:
        return {}
    return doc if isinstance(doc, dict) else {}


def check_world(store: Store, rank: int, world_size: int, timeout: float) -> None:
    """Every rank publishes its view (world size, rank); rank 0 judges, every rank raises.

    Catches, on every rank, what would otherwise time out on internal keys:
    ``WORLD_SIZE is 3 on rank 2 but 2 on rank 0``, ``rank 1 joined twice``,
    ``rank 1 never joined``.
    """
    op = "init_process_group"
    me = {"world_size": world_size, "host": socket.gethostname(), "pid": os.getpid()}
    joins = store.add(f"{_JOINS}{rank}", 1)
    if joins > 1:
        msg = f"rank {rank} joined twice (WORLD_SIZE {world_size}): two processes have RANK={rank}"
        store.set(_VERDICT + "/dup", msg.encode())
        raise DistUsageError(f"{op}: {msg}", rank=rank, op=op)
    store.set(f"{_VIEW}{rank}", msgpack.packb(me))
    deadline = time.monotonic() + timeout
    if rank == 0:
        verdict = _judge(store, world_size, deadline)
        store.set(_VERDICT, verdict.encode())
        if verdict:  # rank 0 hosts the store: keep it up until the others have read why
            _linger(store, world_size, "never joined" in verdict)
    else:
        verdict = _await_verdict(store, rank, world_size, deadline + 5.0)
        if verdict:
            try:
                store.add(_READ, 1)
            except DistError:
                pass  # rank 0 (the store's host) is gone already
    if verdict:
        cls = DistTimeoutError if "never joined" in verdict else DistUsageError
        raise cls(f"{op}: {verdict} (seen on rank {rank})", rank=rank, op=op)


def _linger(store: Store, world_size: int, missing: bool) -> None:
    """Rank 0 after a failing verdict: wait (bounded) until every rank read it.

    Every rank of rank 0's world is waited for, also one that has not published its
    view yet (a slow start on a loaded machine), except when the verdict is that
    ranks never joined: then only those that did.
    """
    end = time.monotonic() + _READ_GRACE_S
    while time.monotonic() < end:
        views = store.multi_get([f"{_VIEW}{r}" for r in range(1, world_size + 1)])
        joined = sum(v is not None for v in views)
        if store.add(_READ, 0) >= (joined if missing else max(joined, world_size - 1)):
            return
        time.sleep(_POLL_S)


def _judge(store: Store, world_size: int, deadline: float) -> str:
    """Rank 0: wait for every rank's view; the first inconsistency, or "" when all agree."""
    while True:
        dup = store.multi_get([_VERDICT + "/dup"])[0]
        if dup is not None:
            return dup.decode(errors="replace")
        views = store.multi_get([f"{_VIEW}{r}" for r in range(world_size + 1)])
        for r, raw in enumerate(views):
            if raw is None or r == 0:
                continue
            theirs = _view(raw).get("world_size")
            if theirs != world_size:
                return f"WORLD_SIZE is {theirs} on rank {r} but {world_size} on rank 0"
        missing = [r for r in range(world_size) if views[r] is None]
        if not missing:
            return ""
        if time.monotonic() >= deadline:
            joined = [r for r in range(world_size) if views[r] is not None]
            who = "rank" if len(missing) == 1 else "ranks"
            return (
                f"{who} {', '.join(map(str, missing))} never joined (WORLD_SIZE {world_size}; "
                f"joined: {', '.join(map(str, joined))})"
            )
        time.sleep(_POLL_S)


def _await_verdict(store: Store, rank: int, world_size: int, deadline: float) -> str:
    """Other ranks: compare with rank 0's view at once, then wait for its verdict."""
    while True:
        verdict, dup, raw0 = store.multi_get([_VERDICT, _VERDICT + "/dup", f"{_VIEW}0"])
        if raw0 is not None:
            theirs = _view(raw0).get("world_size")
            if theirs != world_size:
                return f"WORLD_SIZE is {world_size} on rank {rank} but {theirs} on rank 0"
        if dup is not None:
            return dup.decode(errors="replace")
        if verdict is not None:
            return verdict.decode(errors="replace")
        if time.monotonic() >= deadline:
            return "rank 0 never judged the world (it may have died)"
        time.sleep(_POLL_S)


class _OwnedPrefixStore(PrefixStore):
    """A prefix view that owns its store: closing it closes the connection."""

    def close(self) -> None:
        self.store.close()


def _launcher_store(timeout: float) -> Store | None:
    """The store ``distrib-run`` hosts, for its own workers only (``None`` otherwise)."""
    cfg = config()
    # Only the launcher's direct children: a process the worker starts with its own
    # RANK/WORLD_SIZE forms another world and must not share the workers' keys.
    if cfg.store_addr is None or cfg.launcher_pid != os.getppid():
        return None
    host, _, port = cfg.store_addr.rpartition(":")
    try:
        store = TCPStore(socket.gethostbyname(host.strip("[]")), int(port), timeout=timeout)
    except (ValueError, OSError):
        raise DistUsageError(
            f"init_process_group: DISTRIB_STORE_ADDR={cfg.store_addr!r} is not host:port",
            op="init_process_group",
        ) from None
    store.hosted_by = "the distrib-run launcher"
    prefix = cfg.store_prefix or f"/worker/attempt_{cfg.restart_count or 0}"
    return _OwnedPrefixStore(prefix, store)
