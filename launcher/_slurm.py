"""Slurm awareness: inside ``srun --ntasks-per-node=1 distrib-run ...``, need no flags.

When the launcher runs as a Slurm job step with one task per node, the step's
variables say everything ``--nnodes``/``--node-rank``/``--master-addr``/
``--master-port`` would: ``SLURM_STEP_NUM_NODES``, ``SLURM_NODEID``, the first
host of ``SLURM_STEP_NODELIST``, and a port derived from the job and step ids
(so every node computes the same one without talking). Explicit flags win.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SlurmStep", "first_host", "slurm_step"]

# Rendezvous ports derived from the job id land in 20000..29999: above the usual
# service ports, below Linux's default ephemeral range (32768+), so nothing else
# is likely to hold one.
_PORT_BASE, _PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class SlurmStep:
    """What a one-task-per-node Slurm step tells the launcher."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    text = nodelist.strip()
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,\[]*)", text)
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
    if ranges is None:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + suffix


def slurm_step(environ: Mapping[str, str]) -> SlurmStep | None:
    """The step's layout when this is a one-task-per-node Slurm step, else ``None``."""
    try:
        job_id = int(environ["SLURM_JOB_ID"])
        step_id = int(environ.get("SLURM_STEP_ID", "-1"))
        nnodes = int(environ["SLURM_STEP_NUM_NODES"])
        ntasks = int(environ["SLURM_STEP_NUM_TASKS"])
        node_rank = int(environ["SLURM_NODEID"])
        nodelist = environ["SLURM_STEP_NODELIST"]
    except (KeyError, ValueError):
        return None  # not inside an srun step (e.g. the batch script itself)
    if step_id < 0 or ntasks != nnodes:
        return None  # several tasks per node: each task is a rank, not a launcher
    port = _PORT_BASE + (job_id * 31 + step_id) % _PORT_SPAN
    return SlurmStep(nnodes, node_rank, first_host(nodelist), port)
