"""The exact command lines docs/launcher.md gives for TorchX, Kubernetes and Slurm, run here.

Each test replays on 127.0.0.1 what the platform would run on its nodes:
TorchX's ``dist.ddp`` command line (torchrun's flags, ``--role ''``, ``--tee 3``,
``localhost:0`` on one node), a Kubeflow PyTorchJob pod (no flags, only the
operator's environment), and an sbatch script's ``srun distrib-run`` line with
torchrun's c10d flags. (torchrun itself is covered by tests/test_torchrun.py.)
"""

from __future__ import annotations

import time

import pytest
from _util import free_port
from test_launcher_helpers import LauncherHarness

pytestmark = [pytest.mark.timeout(120)]

TRAIN = """
    import os
    import numpy as np
    import distrib

    distrib.init_process_group()
    x = np.full(3, float(distrib.get_rank() + 1))
    distrib.all_reduce(x)
    print(f"RESULT rank={distrib.get_rank()} world={distrib.get_world_size()} "
          f"node={os.environ['GROUP_RANK']} role={os.environ['ROLE_NAME']!r} sum={x[0]:g}",
          flush=True)
    distrib.destroy_process_group()
"""


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    h.script("train.py", TRAIN)
    yield h
    h.cleanup()


def _results(results: list[tuple[int, str, str]]) -> list[str]:
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    return sorted(
        line.split("]: ", 1)[1]
        for _, out, _ in results
        for line in out.splitlines()
        if "RESULT" in line
    )


def test_torchx_dist_ddp_one_node(launch):
    # torchx run -s local_cwd dist.ddp -j 1x2 --script train.py, with torchrun -> distrib-run
    r = launch.run(
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", "--rdzv_id", "train-x1",
        "--nnodes", "1", "--nproc_per_node", "2", "--tee", "3", "--role", "", "train.py",
        timeout=90,
    )  # fmt: skip
    assert _results([(r.returncode, r.stdout, r.stderr)]) == [
        f"RESULT rank={r} world=2 node=0 role='' sum=3" for r in range(2)
    ]


def test_torchx_dist_ddp_two_nodes_elastic(launch):
    # dist.ddp -j 1:2x1: every replica runs the same line; TORCHX_RANK0_HOST is node 0's host
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [
        launch.popen(
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            endpoint,
            "--rdzv_id",
            "train-x2",
            "--nnodes",
            "1:2",
            "--nproc_per_node",
            "1",
            "--tee",
            "3",
            "--role",
            "",
            "train.py",
        )
        for _ in range(2)
    ]
    assert _results(launch.finish_all(procs, timeout=90)) == [
        f"RESULT rank={r} world=2 node={r} role='' sum=3" for r in range(2)
    ]


def _pod_env(replica: int, port: str, world: int) -> dict[str, str]:
    """What the training operator puts in pod ``replica`` of a PyTorchJob (Master + Workers)."""
    return {
        "MASTER_ADDR": "127.0.0.1",  # the master pod's service name in a cluster
        "MASTER_PORT": port,
        "WORLD_SIZE": str(world),
        "RANK": str(replica),
        "PET_NNODES": str(world),
        "PET_NPROC_PER_NODE": "2",
        "PET_NODE_RANK": str(replica),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": port,
    }


def test_kubernetes_pytorchjob_pods(launch):
    port = str(free_port())
    base = dict(launch.env)
    procs = []
    for replica in (0, 1):  # container command: distrib-run train.py
        launch.env = {**base, **_pod_env(replica, port, 2)}
        procs.append(launch.popen("train.py"))
    launch.env = base
    assert _results(launch.finish_all(procs, timeout=90)) == [
        f"RESULT rank={r} world=4 node={r // 2} role='default' sum=10" for r in range(4)
    ]


def test_kubernetes_pytorchjob_elastic_policy(launch):
    # elasticPolicy {rdzvBackend: c10d, minReplicas: 1, maxReplicas: 2}: the operator adds these
    endpoint = f"127.0.0.1:{free_port()}"
    base = dict(launch.env)
    procs = []
    for _replica in (0, 1):
        launch.env = {
            **base,
            "PET_NNODES": "1:2",
            "PET_NPROC_PER_NODE": "1",
            "PET_RDZV_BACKEND": "c10d",
            "PET_RDZV_ENDPOINT": endpoint,
            "PET_RDZV_ID": "pytorchjob-demo",
        }
        procs.append(launch.popen("train.py"))
    launch.env = base
    assert _results(launch.finish_all(procs, timeout=90)) == [
        f"RESULT rank={r} world=2 node={r} role='default' sum=3" for r in range(2)
    ]


def test_slurm_sbatch_srun_line_with_c10d(launch):
    # srun distrib-run --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d
    #      --rdzv-endpoint $head:29500 --rdzv-id $SLURM_JOB_ID train.py
    endpoint = f"127.0.0.1:{free_port()}"
    base = dict(launch.env)
    procs = []
    for node in (0, 1):
        launch.env = {
            **base,
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_NODES": "2",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_NODEID": str(node),
            "SLURM_STEP_NODELIST": "127.0.0.1",
        }
        procs.append(
            launch.popen(
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "4242",
                "train.py",
            )
        )
    launch.env = base
    assert _results(launch.finish_all(procs, timeout=90)) == [
        f"RESULT rank={r} world=2 node={r} role='default' sum=3" for r in range(2)
    ]


def test_c10d_host_may_start_after_the_others(launch):
    # The node told not to host starts first and finds no store; the host starts
    # seconds later (longer than one store request may wait): the job runs.
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", endpoint, "--rdzv-id", "late-host"]  # fmt: skip
    second = launch.popen(*common, "--rdzv-conf", "is_host=0,join_timeout=40", "train.py")
    time.sleep(5.0)
    assert second.poll() is None, "the node that does not host gave up before the host started"
    first = launch.popen(*common, "--rdzv-conf", "is_host=1,join_timeout=40", "train.py")
    assert _results(launch.finish_all([first, second], timeout=90)) == [
        f"RESULT rank={r} world=2 node={r} role='default' sum=3" for r in range(2)
    ]
