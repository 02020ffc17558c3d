"""Turn ``init_process_group``'s arguments into (store, rank, world size, bind host).

``env://`` reads torch's ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``;
without ``RANK``/``WORLD_SIZE`` it falls back to Slurm (``SLURM_PROCID``,
``SLURM_NTASKS``), Open MPI (``OMPI_COMM_WORLD_RANK``/``SIZE``) and MPICH/PMI
(``PMI_RANK``/``PMI_SIZE``). ``tcp://host:port`` names the store directly and
``file://path`` uses a ``FileStore``. Rank 0 hosts the TCP store, except under
torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``), where every rank is a client
of the agent's c10d store at ``MASTER_ADDR:MASTER_PORT``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .._errors import DistUsageError
from ._file_store import FileStore
from ._store import Store, TCPStore
from ._torch_store import torchelastic_store

__all__ = ["Rendezvous", "local_rank_from_env", "rendezvous"]

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
    if parsed.scheme == "env":  # under torchrun its agent serves MASTER_PORT: be its client
        agent_store = torchelastic_store(env, socket.gethostbyname(host), port, timeout)
        if agent_store is not None:
            return Rendezvous(agent_store, rank, world_size, bind_host, True)
    is_master = rank == 0
    store = TCPStore(
        socket.gethostbyname(host),
        port,
        world_size,
        is_master=is_master,
        timeout=timeout,
        wait_for_workers=False,
    )
    return Rendezvous(store, rank, world_size, bind_host, True)
