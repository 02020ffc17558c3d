"""``distrib-run --ray [ADDRESS]``: the script's ranks as Ray actors instead of local children.

Ray places ``--nproc`` workers (in all, over the cluster) and ``distrib.ray``
starts, watches, reports and restarts them with ``distrib-run``'s guarantees.
Ray is imported only here, so plain ``distrib-run`` never needs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid

from distrib._errors import DistError

__all__ = ["main_ray", "split_ray_address"]

# Flags that place workers by hand; under --ray, Ray places them.
_NODE_FLAGS = (
    ("nnodes", "--nnodes"),
    ("master_addr", "--master-addr"),
    ("master_port", "--master-port"),
)
_LOCAL_ONLY = (
    ("log_dir", "--log-dir"),
    ("redirects", "--redirects"),
    ("tee", "--tee"),
    ("local_ranks_filter", "--local-ranks-filter"),
)


def _looks_like_address(text: str) -> bool:
    return text in ("auto", "local") or ":" in text


# distrib-run flags that take no value (every other flag before the target takes one)
_NO_VALUE = {"--standalone", "-m", "--module", "--no-python", "--no_python", "--no-prefix"}


def split_ray_address(argv: list[str]) -> list[str]:
    """``--ray train.py``: the script is not an ADDRESS; make it ``--ray= train.py``.

    Only distrib-run's own flags (before the target) are looked at, never the script's.
    """
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--ray":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("-") and not _looks_like_address(nxt):
                return [*argv[:i], "--ray=", *argv[i + 1 :]]
            return argv
        if tok == "--" or not tok.startswith("-"):
            return argv  # the target: what follows belongs to the script
        i += 1 if ("=" in tok or tok in _NO_VALUE) else 2
    return argv


def _check(ns: argparse.Namespace) -> None:
    for name, flag in _NODE_FLAGS:
        if getattr(ns, name) is not None:
            raise ValueError(f"{flag} cannot be combined with --ray: Ray places the workers")
    if ns.node_rank != 0 or ns.standalone:
        raise ValueError("--node-rank/--standalone cannot be combined with --ray")
    for name, flag in _LOCAL_ONLY:
        if getattr(ns, name) is not None:
            raise ValueError(f"{flag} is not supported with --ray (output goes to the console)")
    if ns.nproc.strip().lower() not in ("auto", "gpu"):
        _workers(ns.nproc)  # a number: checked before any cluster is contacted
    if ns.max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, got {ns.max_restarts}")
    if ns.timeout is not None and not ns.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {ns.timeout}")
    if not ns.grace_period > 0:
        raise ValueError(f"--grace-period must be > 0 seconds, got {ns.grace_period}")
    if ns.run_id is not None and (not ns.run_id or any(c in ns.run_id for c in "/\\\0")):
        raise ValueError(f"--run-id must be a non-empty name without slashes, got {ns.run_id!r}")


def _workers(text: str) -> tuple[int, float]:
    """(workers, GPUs each) from --nproc: N, 'auto' (cluster CPUs) or 'gpu' (cluster GPUs)."""
    value = text.strip().lower()
    if value in ("auto", "gpu"):
        import ray

        key = "CPU" if value == "auto" else "GPU"
        count = int(ray.cluster_resources().get(key, 0))
        if count < 1:
            raise ValueError(f"--nproc {value}: the Ray cluster has no {key}")
        return count, 1.0 if value == "gpu" else 0.0
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"--nproc must be an integer, 'auto' or 'gpu', got {text!r}") from None
    if count < 1:
        raise ValueError(f"--nproc must be >= 1, got {count}")
    return count, 0.0


def main_ray(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    """Run ``ns.target`` on Ray; returns distrib-run's exit status."""
    try:
        _check(ns)
        from distrib.ray._run import job_env, require_ray

        env, token = job_env(None)
        if ns.auth_token_file is not None:
            try:
                with open(ns.auth_token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as exc:
                raise ValueError(f"--auth-token-file {ns.auth_token_file!r}: {exc.strerror}")
            if not token:
                raise ValueError(f"--auth-token-file {ns.auth_token_file!r} is empty")
        require_ray()
    except (ValueError, ImportError, DistError) as exc:
        parser.error(str(exc))
    import ray

    from distrib.ray._job import JobSpec, launch

    address = ns.ray or os.environ.get("RAY_ADDRESS") or None
    started_here = address is None
    if address == "local":
        address, started_here = None, True
    if started_here:  # a new private instance on loopback, gone when we are
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)  # fmt: skip
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        try:
            nproc, gpus = _workers(ns.nproc)
        except ValueError as exc:
            parser.error(str(exc))
        mode = "module" if ns.module else "exec" if ns.no_python else "script"
        target = ns.target
        if mode == "script" and os.path.exists(target):
            target = os.path.abspath(target)
        spec = JobSpec(
            num_workers=nproc,
            run_id=ns.run_id or uuid.uuid4().hex[:12],
            command=[mode, target, *ns.args],
            cwd=os.getcwd(),
            gpus_per_worker=gpus,
            max_restarts=ns.max_restarts,
            env=env,
            timeout=ns.timeout,
            grace_period=ns.grace_period,
            prefix_output=ns.prefix,
        )
        try:
            launch(spec, token)
        except DistError as exc:
            print(str(exc), file=sys.stderr, end="" if str(exc).endswith("\n") else "\n")
            return 1
        except KeyboardInterrupt:
            return 130
        return 0
    finally:
        ray.shutdown()
