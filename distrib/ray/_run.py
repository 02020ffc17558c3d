"""``distrib.ray.run``: a function as the ranks of one distrib job on a Ray cluster."""

from __future__ import annotations

import datetime
import math
import os
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._config import config
from ._job import JobSpec, launch

__all__ = ["PLACEMENTS", "job_env", "require_ray", "run"]

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# Set for every rank by distrib.ray; env= may not override them.
_RESERVED = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DISTRIB_NODE_ID",
    "DISTRIB_RUN_ID", "DISTRIB_RESTART_COUNT", "DISTRIB_MAX_RESTARTS", "DISTRIB_ERROR_FILE",
    "DISTRIB_LAUNCHER_PID",
)  # fmt: skip
# The driver's settings that follow the job to every rank (unless env= sets them).
_FORWARDED = (
    "DISTRIB_TIMEOUT", "DISTRIB_TRANSPORT", "DISTRIB_CHECK_MISMATCH", "DISTRIB_DEBUG",
    "DISTRIB_NATIVE", "DISTRIB_SHARING_STRATEGY", "DISTRIB_INLINE_THRESHOLD",
)  # fmt: skip


def require_ray() -> None:
    """Raise ``ImportError`` with the install command when Ray or cloudpickle is missing."""
    try:
        import cloudpickle  # noqa: F401
        import ray  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"distrib.ray needs Ray and cloudpickle ({exc}); install them with "
            "pip install 'distrib[ray]'"
        ) from None


def job_env(env: Mapping[str, str] | None) -> tuple[dict[str, str], str]:
    """Validate ``env`` and add the forwarded ``DISTRIB_*`` settings; also pick the secret.

    Returns (environment for every rank, the job's auth token).
    """
    if env is not None and not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, got {type(env).__name__}")
    out: dict[str, str] = {}
    for k, v in (env or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"env must map str to str, got {k!r}: {v!r}")
        if k in _RESERVED:
            raise ValueError(f"env sets {k}, which distrib.ray sets for each rank itself")
        out[k] = v
    config(out)  # an unknown or malformed DISTRIB_* name fails here, on the driver
    for k in _FORWARDED:
        if k in os.environ and k not in out:
            out[k] = os.environ[k]
    token = out.pop("DISTRIB_AUTH_TOKEN", None) or config().auth_token or secrets.token_hex(16)
    return out, token


def check_finite(name: str, value: Any, *, minimum: float, strict: bool) -> float:
    """``value`` as a float, finite and ``> minimum`` (``strict``) or ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = not math.isfinite(v) or (v <= minimum if strict else v < minimum)
    if bad:
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {rel} {minimum:g}, got {value!r}")
    return v


def check_placement(placement: Any) -> str:
    if not isinstance(placement, str) or placement.upper() not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    return placement.upper()


def check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    return check_finite("timeout", timeout, minimum=0.0, strict=True)


def check_resources(cpus: Any, gpus: Any) -> tuple[float, float]:
    c = check_finite("cpus_per_worker", cpus, minimum=0.0, strict=False)
    g = check_finite("gpus_per_worker", gpus, minimum=0.0, strict=False)
    if c == 0 and g == 0:
        raise ValueError("cpus_per_worker and gpus_per_worker are both 0: a worker needs some")
    return c, g


def run(
    fn: Callable[..., Any],
    *,
    num_workers: int,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    placement: str = "PACK",
    max_restarts: int = 0,
    env: Mapping[str, str] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` as ranks 0..num_workers-1 of one job on Ray.

    Each rank is a process started by its own Ray actor, placed by a placement
    group (``placement``: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD), with
    ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT`` and a job secret (``DISTRIB_AUTH_TOKEN``) set,
    so ``distrib.init_process_group()`` in ``fn`` just works. Ranks on one Ray node
    share memory; ranks on different nodes use the ZeroMQ ring.

    Returns the return values in rank order. Every output line reaches the
    driver prefixed ``[RANK]: ``. A rank that raises or dies stops the others;
    after ``max_restarts`` restarts of the whole group, raises ``DistError`` with
    the report (rank, node, exit code or signal, traceback). ``timeout`` bounds
    each attempt in seconds. Without ``ray.init()`` first, ``ray.init()`` is called.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    n = check_count("num_workers", num_workers, 1)
    cpus, gpus = check_resources(cpus_per_worker, gpus_per_worker)
    strategy = check_placement(placement)
    restarts = check_count("max_restarts", max_restarts, 0)
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"args must be a tuple or list, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping or None, got {type(kwargs).__name__}")
    if kwargs is not None and not all(isinstance(k, str) for k in kwargs):
        raise TypeError("kwargs must have str keys")
    limit = check_timeout(timeout)
    rank_env, token = job_env(env)
    require_ray()
    import cloudpickle

    payload = cloudpickle.dumps((fn, tuple(args), dict(kwargs or {})))
    spec = JobSpec(
        num_workers=n,
        run_id=uuid.uuid4().hex[:12],
        payload=payload,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
        placement=strategy,
        max_restarts=restarts,
        env=rank_env,
        timeout=limit,
    )
    return launch(spec, token)
