"""The launcher's validated settings, and parsers for its compact flag syntaxes."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from distrib._validate import COUNT, GRACE, INTERVAL, NODES, PROCS, TIMEOUT, Bound, check_number

from ._torchrun_flags import TorchrunSettings

__all__ = [
    "MISSING_SECRET",
    "LaunchOptions",
    "check_log_dir",
    "parse_nproc",
    "parse_rank_set",
    "parse_std_streams",
]

# Refusal of a multi-node job without a shared secret (the CLI and JobStore both check).
MISSING_SECRET = (
    "--nnodes {nnodes} needs a shared secret so that only this job's launchers and workers "
    "can use its store: put one in a file readable only by you (python -c 'import secrets; "
    "print(secrets.token_hex(32))' > ~/.distrib-token; chmod 600 ~/.distrib-token) and pass "
    "--auth-token-file ~/.distrib-token on every node, or set DISTRIB_AUTH_TOKEN on every "
    "node; or pass --insecure-store to run without authentication (anyone who can reach "
    "--master-addr:--master-port could then read and forge the job's state)"
)

# Bits of a --redirects / --tee value, torchrun's numbering: 1 stdout, 2 stderr, 3 both.
STDOUT = 1
STDERR = 2


@dataclass
class LaunchOptions:
    """Everything one ``distrib-run`` invocation needs; built by the CLI or by hand."""

    target: str  # script path, module name (module=True) or executable (no_python=True)
    args: list[str] = field(default_factory=list)
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: single node picks a free port
    module: bool = False
    no_python: bool = False
    max_restarts: int = 0
    monitor_interval: float = 0.1
    log_dir: str | None = None
    redirects: dict[int, int] = field(default_factory=dict)  # local rank -> stream bits
    tee: dict[int, int] = field(default_factory=dict)  # local rank -> stream bits
    local_ranks_filter: set[int] | None = None  # None: every local rank reaches the console
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    timeout: float | None = None  # wall-clock limit of one attempt
    grace_period: float = 5.0  # SIGTERM -> SIGKILL delay when stopping workers
    node_timeout: float = 30.0  # multi-node: silence after which a peer launcher is lost
    join_timeout: float = 300.0  # multi-node: how long launchers wait for each other to join
    auth_token: str | None = None  # None: one node makes one per job; several need one
    insecure_store: bool = False  # several nodes without a shared secret (explicit opt-out)
    python: str | None = None  # interpreter for workers (default: this one)
    prefix_output: bool = True
    torchrun: TorchrunSettings = field(default_factory=TorchrunSettings)  # torchrun-only flags

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        for name, bound in _BOUNDS.items():
            value = getattr(self, name)
            if value is not None or name != "timeout":  # --timeout: None means no limit
                setattr(self, name, check_number(value, _flag(name), bound))
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"--node-rank must be in [0, {self.nnodes - 1}] for --nnodes {self.nnodes}, "
                f"got {self.node_rank}"
            )
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError(
                "--master-port is required with --nnodes > 1 (every node must meet there)"
            )
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"--master-port must be in 1..65535, got {self.master_port}")
        if self.nnodes > 1 and self.auth_token is None and not self.insecure_store:
            from distrib.store._auth import is_loopback, shared_job_token

            if not is_loopback(self.master_addr) or self.master_port is None:
                raise ValueError(MISSING_SECRET.format(nnodes=self.nnodes))
            # Every launcher is on this host: a private per-user file carries the secret.
            self.auth_token = shared_job_token(self.master_addr, self.master_port).decode()
        if self.module and self.no_python:
            raise ValueError("-m/--module and --no-python cannot be combined")
        for name in ("redirects", "tee", "local_ranks_filter"):
            ranks = getattr(self, name) or ()
            bad = sorted(r for r in ranks if not 0 <= r < self.nproc)
            if bad:
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} names local rank(s) {bad}, but --nproc is {self.nproc} "
                    f"(local ranks 0..{self.nproc - 1})"
                )
        if self.log_dir is not None:
            check_log_dir(self.log_dir)
        if not self.run_id or any(c in self.run_id for c in "/\\\0"):
            raise ValueError(
                f"--run-id must be a non-empty name without slashes, got {self.run_id!r}"
            )


# The numeric settings and their accepted ranges (distrib/_validate.py states why).
_BOUNDS: dict[str, Bound] = {
    "nproc": PROCS,
    "nnodes": NODES,
    "max_restarts": COUNT,
    "monitor_interval": INTERVAL,
    "grace_period": GRACE,
    "timeout": TIMEOUT,
    "node_timeout": TIMEOUT,
    "join_timeout": TIMEOUT,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_log_dir(path: str) -> None:
    """Create ``path`` if needed and prove it writable; ``ValueError`` naming path and reason."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".distrib-run-probe-")  # noqa: SIM115
        probe.close()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"--log-dir {path!r} is not a writable directory: {reason}") from None


def visible_gpu_count(environ: Mapping[str, str] | None = None) -> int:
    """Count the GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``)."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def parse_nproc(text: str, environ: Mapping[str, str] | None = None) -> int:
    """Parse ``--nproc``: a positive integer, ``auto`` (CPU count) or ``gpu`` (visible GPUs)."""
    value = text.strip().lower()
    if value == "auto":
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    if value == "gpu":
        count = visible_gpu_count(environ)
        if count == 0:
            raise ValueError("--nproc gpu: no visible GPU (CUDA_VISIBLE_DEVICES / nvidia-smi)")
        return count
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"--nproc must be an integer, 'auto' or 'gpu', got {text!r}") from None
    if count < 1:
        raise ValueError(f"--nproc must be >= 1, got {count}")
    return count


def parse_rank_set(text: str) -> set[int]:
    """Parse ``0,2,4-6`` into ``{0, 2, 4, 5, 6}`` (for ``--local-ranks-filter``)."""
    ranks: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                ranks.update(range(lo, hi + 1))
            else:
                ranks.add(int(part))
        except ValueError:
            raise ValueError(
                f"bad local rank list {text!r}: expected e.g. '0', '0,2' or '0-3'"
            ) from None
    if not ranks or min(ranks) < 0:
        raise ValueError(f"bad local rank list {text!r}: expected e.g. '0', '0,2' or '0-3'")
    return ranks


def parse_std_streams(text: str, nproc: int) -> dict[int, int]:
    """Parse torchrun's ``--redirects`` / ``--tee``: ``3`` (all ranks) or ``0:1,1:2`` per rank.

    Values: 0 none, 1 stdout, 2 stderr, 3 both. Returns local rank -> bits.
    """

    def bits(v: str) -> int:
        try:
            b = int(v)
        except ValueError:
            b = -1
        if b not in (0, 1, 2, 3):
            raise ValueError(
                f"bad stream selector {v!r} in {text!r}: expected 0 (none), 1 (stdout), "
                "2 (stderr) or 3 (both)"
            )
        return b

    text = text.strip()
    if ":" not in text:
        b = bits(text)
        return {r: b for r in range(nproc)}
    out: dict[int, int] = {}
    for part in text.split(","):
        rank, _, value = part.partition(":")
        try:
            r = int(rank)
        except ValueError:
            raise ValueError(f"bad local rank {rank!r} in {text!r}: expected RANK:0..3") from None
        out[r] = bits(value)
    return out
