"""Hierarchical collectives on two real "hosts": network namespaces joined by a veth pair.

The launcher issue's setup: each namespace gets an address from 198.18.0.0/15
and its own hostname (``unshare --uts``) and runs ``distrib-run --nproc 2``;
the 4 workers pick the hierarchical engine themselves (same-host pairs share
memory, leaders talk TCP over the veth link) and check every hierarchical
collective against numpy. Skips with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from _netns import ADDR, PORT, two_hosts
from test_launcher_helpers import LauncherHarness

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


@pytest.fixture
def hosts():
    """Two namespaces joined by a veth pair (see tests/_netns.py)."""
    with two_hosts("h") as (ns, _links):
        yield ns


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    h.env["DISTRIB_TIMEOUT"] = "20"
    yield h
    h.cleanup()


HIER_SUITE = """
    import os
    import numpy as np
    import distrib as dist
    from distrib.comm import _api

    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = type(_api._require("test").group.cpu_engine).__name__
    assert engine == "HierEngine", engine

    def data(r, count, dtype=np.int64):
        return np.random.default_rng(r).integers(-9, 10, count).astype(dtype)

    for count in (1, 1001, 600_001):  # the last spans many shm steps and zmq segments
        x = data(rank, count)
        dist.all_reduce(x)
        assert np.array_equal(x, sum(data(r, count) for r in range(world))), count
    x = data(rank, 999, np.float32)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    assert np.array_equal(x, np.max([data(r, 999, np.float32) for r in range(world)], 0))
    for root in range(world):
        y = data(rank, 4097, np.float64)
        dist.broadcast(y, src=root)
        assert np.array_equal(y, data(root, 4097, np.float64)), root
    outs = [np.zeros(333, np.int32) for _ in range(world)]
    dist.all_gather(outs, data(rank, 333, np.int32))
    for r in range(world):
        assert np.array_equal(outs[r], data(r, 333, np.int32)), r
    dist.barrier()
    print("hier ok on", os.uname().nodename, "rank", rank, flush=True)
    dist.destroy_process_group()
"""


def _node(launch, ns: str, node: int, script: str) -> subprocess.Popen[str]:
    token = launch.dir / "token"  # several nodes need a shared secret
    token.write_text("hier-test-secret\n")
    token.chmod(0o600)
    inner = [sys.executable, "-m", "launcher", "--nnodes", "2", "--node-rank", str(node),
             "--master-addr", ADDR[0], "--master-port", PORT, "--nproc", "2",
             "--node-timeout", "3", "--join-timeout", "30", "--auth-token-file", str(token),
             script]  # fmt: skip
    cmd = ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
           f'hostname node{node} && exec "$@"', "sh", *inner]  # fmt: skip
    p = subprocess.Popen(
        cmd, cwd=launch.dir, env=launch.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    launch._popens.append(p)
    return p


def test_two_hosts_by_two_ranks_hierarchical_collectives(hosts, launch):
    script = launch.script("hier.py", HIER_SUITE)
    procs = [_node(launch, hosts[n], n, script) for n in (0, 1)]
    results = [(p.wait(timeout=75), *p.communicate(timeout=10)) for p in procs]
    for node, (code, out, err) in enumerate(results):
        assert code == 0, out + err
        for r in (0, 1) if node == 0 else (2, 3):
            assert f"hier ok on node{node} rank {r}" in out, out + err
