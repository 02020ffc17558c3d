"""Two "hosts" made of Linux network namespaces joined by a veth pair, real TCP between.

Each namespace gets one address from the benchmarking range 198.18.0.0/15 and its
own hostname (``unshare --uts``); a launcher runs in each. Namespace and link
names carry this process's pid so concurrent runs never collide, and are removed
even when a test fails. Skips with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from _netns import ADDR, PORT, ip, two_hosts
from test_launcher_helpers import LauncherHarness

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


@pytest.fixture
def hosts():
    """Two namespaces joined by a veth pair (see tests/_netns.py)."""
    with two_hosts("r") as (ns, links):
        yield (ns, links)


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    h.env["DISTRIB_TIMEOUT"] = "20"  # the workers' collectives give up in bounded time
    (h.dir / "token").write_text("shared-secret\n")  # several nodes need a shared secret
    (h.dir / "token").chmod(0o600)
    yield h
    h.cleanup()


def _node(
    launch, ns: str, node: int, script: str, *script_args: str, auth: str | None = "token",
    node_timeout: str = "15",
):  # fmt: skip
    # The launcher runs inside the namespace, with a hostname of its own.
    inner = [sys.executable, "-m", "launcher", "--nnodes", "2", "--node-rank", str(node),
             "--master-addr", ADDR[0], "--master-port", PORT, "--nproc", "2",
             "--node-timeout", node_timeout, "--join-timeout", "30",
             *(["--auth-token-file", auth] if auth else []), script, *script_args]  # fmt: skip
    cmd = ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
           f'hostname node{node} && exec "$@"', "sh", *inner]  # fmt: skip
    p = subprocess.Popen(
        cmd, cwd=launch.dir, env=launch.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    launch._popens.append(p)
    return p


ALL_REDUCE = """
    import os, sys, time
    import numpy as np
    import distrib as dist

    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    x = np.arange(1001, dtype=np.float64) + rank
    dist.all_reduce(x)
    expect = world * np.arange(1001, dtype=np.float64) + world * (world - 1) / 2
    assert np.array_equal(x, expect), x[:4]
    print("all_reduce ok on", os.uname().nodename, "rank", rank, flush=True)
    MODE = sys.argv[1] if len(sys.argv) > 1 else "once"
    if MODE != "once":
        open(f"up.{rank}", "w").write("up\\n")
        end = time.monotonic() + 60
        while time.monotonic() < end:  # keep collectives flowing until stopped
            if MODE == "kill" and rank == 3 and all(os.path.exists(f"up.{r}") for r in range(4)):
                os.kill(os.getpid(), 9)
            dist.all_reduce(x)
            time.sleep(0.05)
    dist.destroy_process_group()
"""


def test_two_by_two_all_reduce_over_veth(hosts, launch):
    (ns, _links) = hosts
    script = launch.script("ar.py", ALL_REDUCE)
    (launch.dir / "token").write_text("shared-secret\n")  # launchers and workers sign traffic
    procs = [_node(launch, ns[n], n, script, auth="token") for n in (0, 1)]
    results = launch.finish_all(procs, timeout=60)
    for node, (code, out, err) in enumerate(results):
        assert code == 0, err
        ranks = (0, 1) if node == 0 else (2, 3)
        for r in ranks:
            assert f"[{r}]: all_reduce ok on node{node} rank {r}" in out


def test_worker_killed_on_node1_stops_both_nodes_with_report(hosts, launch):
    (ns, _links) = hosts
    script = launch.script("ar.py", ALL_REDUCE)
    procs = [_node(launch, ns[n], n, script, "kill") for n in (0, 1)]
    results = launch.finish_all(procs, timeout=60)
    for code, _out, err in results:
        assert code == 1, err
        assert "ROOT CAUSE" in err, err
        root = err[err.index("ROOT CAUSE") :]
        assert "rank 3 (local rank 1, node 1) on host node1" in root
        assert "killed by SIGKILL" in root


def test_link_cut_mid_run_ends_both_sides_within_timeout(hosts, launch):
    (ns, links) = hosts
    script = launch.script("ar.py", ALL_REDUCE)
    procs = [_node(launch, ns[n], n, script, "loop", node_timeout="3") for n in (0, 1)]
    for r in range(4):
        launch.wait_for_file(f"up.{r}", timeout=60)
    ip("-n", ns[1], "link", "set", links[1], "down")
    t0 = time.monotonic()
    results = launch.finish_all(procs, timeout=60)
    elapsed = time.monotonic() - t0
    # --node-timeout 3 plus one 2 s store request and the stop: well under 20 s
    assert elapsed < 20, elapsed
    for code, _out, err in results:
        assert code == 1, err
        assert "FAILED" in err
    assert "node 1's launcher sent no heartbeat" in results[0][2] or "ROOT CAUSE" in results[0][2]
    assert "launchers' store" in results[1][2] or "ROOT CAUSE" in results[1][2], results[1][2]
