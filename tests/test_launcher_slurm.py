"""Slurm awareness: a one-task-per-node srun step needs no multi-node flags."""

from __future__ import annotations

import random
import socket

import pytest
from test_launcher_helpers import LauncherHarness

from launcher._slurm import first_host, slurm_step

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node7", "node7"),
        ("gpu[07-09,12]", "gpu07"),
        ("gpu[3,5],cpu1", "gpu3"),
        ("rack1-n[001-004]-ib", "rack1-n001-ib"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def _step_env(job: int, step: int, nnodes: int, ntasks: int, node: int, nodelist: str):
    return {
        "SLURM_JOB_ID": str(job),
        "SLURM_STEP_ID": str(step),
        "SLURM_STEP_NUM_NODES": str(nnodes),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_NODEID": str(node),
        "SLURM_STEP_NODELIST": nodelist,
    }


def test_slurm_step_layout():
    s = slurm_step(_step_env(4242, 0, 4, 4, 2, "gpu[07-10]"))
    assert (s.nnodes, s.node_rank, s.master_addr) == (4, 2, "gpu07")
    assert 20000 <= s.master_port < 30000
    # every node derives the same meeting point without talking
    other = slurm_step(_step_env(4242, 0, 4, 4, 0, "gpu[07-10]"))
    assert (other.master_addr, other.master_port) == (s.master_addr, s.master_port)
    assert slurm_step(_step_env(4242, 0, 4, 16, 2, "gpu[07-10]")) is None  # a task per rank
    assert slurm_step({"SLURM_JOB_ID": "1"}) is None  # the batch script, not a step
    assert slurm_step({}) is None


def _free_port_in_slurm_range() -> int:
    for _ in range(200):
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 20000..29999")


def test_two_nodes_under_a_fake_srun_step(tmp_path):
    launch = LauncherHarness(tmp_path)
    try:
        port = _free_port_in_slurm_range()
        job = 777
        step = (port - 20000 - job * 31) % 10000  # so the derived port is the free one
        script = launch.script(
            "w.py", "import os\nprint('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\n"
        )
        procs = []
        launch.env["DISTRIB_AUTH_TOKEN"] = "slurm-test-secret"  # several nodes need one
        for node in (0, 1):
            launch.env.update(_step_env(job, step, 2, 2, node, "127.0.0.1"))
            procs.append(launch.popen("--nproc", "1", "--node-timeout", "30", script))
        results = launch.finish_all(procs, timeout=40)
        for node, (code, out, err) in enumerate(results):
            assert code == 0, err
            assert f"Slurm step: node {node} of 2, launchers meet at 127.0.0.1:{port}" in err
            assert out == f"[{node}]: rank {node} of 2\n"
    finally:
        launch.cleanup()
