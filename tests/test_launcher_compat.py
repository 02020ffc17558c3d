"""Compatibility: a torch.distributed (gloo, env://) script runs unchanged under distrib-run.

torch lives in a separate virtualenv (/opt/peers) or in this interpreter; the
launcher runs with that interpreter (distrib-run needs only the standard library
on one node), so the workers it starts can import torch. Skips cleanly where
neither has torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
from test_launcher_helpers import LauncherHarness

# torch in a separate virtualenv when there is one, else in this interpreter (CI installs it)
PEER_PYTHON = (
    "/opt/peers/bin/python"
    if os.path.exists("/opt/peers/bin/python") or importlib.util.find_spec("torch") is None
    else sys.executable
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(PEER_PYTHON), reason=f"needs torch at {PEER_PYTHON}"),
]


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    yield h
    h.cleanup()


def test_torch_gloo_env_script_runs_unchanged(launch):
    script = launch.script(
        "torch_ddp.py",
        """
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method="env://")  # rank 0 binds MASTER_PORT
        t = torch.ones(4) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        print("torch all_reduce", dist.get_rank(), dist.get_world_size(), t.tolist())
        dist.destroy_process_group()
        """,
    )
    r = launch.run("--nproc", "2", script, python=PEER_PYTHON, timeout=100)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [
        "[0]: torch all_reduce 0 2 [3.0, 3.0, 3.0, 3.0]",
        "[1]: torch all_reduce 1 2 [3.0, 3.0, 3.0, 3.0]",
    ]


def test_torch_record_error_file_reaches_the_report(launch):
    script = launch.script(
        "torch_fail.py",
        """
        import sys
        from torch.distributed.elastic.multiprocessing.errors import record

        @record
        def main():
            raise ValueError("torch-side failure")

        main()
        """,
    )
    r = launch.run("--nproc", "1", script, python=PEER_PYTHON, timeout=100)
    assert r.returncode == 1
    root = r.stderr[r.stderr.index("ROOT CAUSE") :]
    assert "ValueError: torch-side failure" in root
