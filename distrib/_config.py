"""One validated view of every ``DISTRIB_*`` environment variable.

Nothing else in distrib reads ``DISTRIB_*`` variables directly: modules call
``config()`` and get typed, checked values. A ``DISTRIB_*`` name we do not know
is rejected (a typo like ``DISTRIB_TIMOUT`` would otherwise be silently ignored).
Torch-compatible variables (``RANK``, ``MASTER_ADDR`` ...) are read where they
are used, since they belong to other tools too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._errors import DistUsageError
from ._validate import COUNT, TIMEOUT, Bound, check_number

__all__ = ["Config", "config"]


def _float(v: str) -> float:
    return float(v)


def _int(v: str) -> int:
    return int(v)


def _str(v: str) -> str:
    return v


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0/true/false), got {v!r}")


@dataclass(frozen=True)
class Config:
    """Typed values of the ``DISTRIB_*`` environment variables (``None`` = unset)."""

    timeout: float | None = None  # DISTRIB_TIMEOUT: default collective/store timeout, seconds
    auth_token: str | None = None  # DISTRIB_AUTH_TOKEN: shared secret for store/launcher traffic
    transport: str | None = None  # DISTRIB_TRANSPORT: "auto" | "zmq" | "shm" for CPU collectives
    check_mismatch: bool | None = None  # DISTRIB_CHECK_MISMATCH: collective consistency checks
    debug: bool | None = None  # DISTRIB_DEBUG: verbose logging
    run_id: str | None = None  # DISTRIB_RUN_ID: set by distrib-run
    restart_count: int | None = None  # DISTRIB_RESTART_COUNT: set by distrib-run
    max_restarts: int | None = None  # DISTRIB_MAX_RESTARTS: set by distrib-run
    error_file: str | None = None  # DISTRIB_ERROR_FILE: where a worker writes its traceback
    sharing_strategy: str | None = None  # DISTRIB_SHARING_STRATEGY: file_descriptor | file_system
    shm_dir: str | None = None  # DISTRIB_SHM_DIR: directory for named segments (default /dev/shm)
    inline_threshold: int | None = None  # DISTRIB_INLINE_THRESHOLD: bytes pickled inline
    launcher_pid: int | None = None  # DISTRIB_LAUNCHER_PID: set by distrib-run for workers
    store_addr: str | None = None  # DISTRIB_STORE_ADDR: host:port of distrib-run's job store
    store_prefix: str | None = None  # DISTRIB_STORE_PREFIX: set by distrib-run: workers' keys
    local_ranks_filter: str | None = None  # DISTRIB_LOCAL_RANKS_FILTER: reserved for distrib-run
    native: bool | None = None  # DISTRIB_NATIVE: 0 keeps the shm engine's numpy path (no C step)
    dump_fd: int | None = None  # DISTRIB_DUMP_FD: set by distrib-run: a byte there asks for stacks
    short_slice: bool | None = None  # DISTRIB_SHORT_SLICE: 0 keeps waiting threads' kernel slice
    node_id: str | None = None  # DISTRIB_NODE_ID: this rank's node (set by distrib.ray); ranks
    # share memory only when their machine and node id are both equal


_PARSERS: dict[str, Callable[[str], Any]] = {
    "timeout": _float,
    "auth_token": _str,
    "transport": _str,
    "check_mismatch": _bool,
    "debug": _bool,
    "run_id": _str,
    "restart_count": _int,
    "max_restarts": _int,
    "error_file": _str,
    "sharing_strategy": _str,
    "shm_dir": _str,
    "inline_threshold": _int,
    "launcher_pid": _int,
    "store_addr": _str,
    "store_prefix": _str,
    "local_ranks_filter": _str,
    "native": _bool,
    "short_slice": _bool,
    "node_id": _str,
    "dump_fd": _int,
}

# Numeric variables and their accepted ranges (NaN, infinities, negatives and absurd
# values are refused, naming the variable; distrib/_validate.py says why each bound).
_BOUNDS: dict[str, Bound] = {
    "timeout": TIMEOUT,
    "restart_count": COUNT,
    "max_restarts": COUNT,
    "inline_threshold": Bound(0, 2**40, low_inclusive=True, integer=True, unit=" bytes"),
    "launcher_pid": Bound(1, 2**22, low_inclusive=True, integer=True, unit=""),
    "dump_fd": Bound(0, 2**20, low_inclusive=True, integer=True, unit=""),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "transport": ("auto", "zmq", "shm"),
    "sharing_strategy": ("file_descriptor", "file_system"),
}


def config(environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate the ``DISTRIB_*`` variables of ``environ`` (default ``os.environ``).

    Raises:
        DistUsageError: an unknown ``DISTRIB_*`` name, or a value of the wrong form.
    """
    env = os.environ if environ is None else environ
    known = {f.name for f in fields(Config)}
    values: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith("DISTRIB_"):
            continue
        name = key[len("DISTRIB_") :].lower()
        if name not in known:
            raise DistUsageError(
                f"unknown environment variable {key}; distrib knows "
                + ", ".join("DISTRIB_" + k.upper() for k in sorted(known)),
                op="config",
            )
        try:
            value = _PARSERS[name](raw)
        except ValueError as exc:
            raise DistUsageError(f"{key}={raw!r} is invalid: {exc}", op="config") from None
        choices = _CHOICES.get(name)
        if choices is not None and value not in choices:
            raise DistUsageError(
                f"{key}={raw!r} is invalid: expected one of {', '.join(choices)}", op="config"
            )
        bound = _BOUNDS.get(name)
        if bound is not None:
            value = check_number(value, f"{key}={raw!r} is invalid: {key}", bound, DistUsageError)
        values[name] = value
    return Config(**values)
