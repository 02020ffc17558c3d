"""distrib-run with several launchers ("nodes") meeting over TCP on 127.0.0.1."""

from __future__ import annotations

import json
import re
import time

import pytest
from _util import free_port
from test_launcher_helpers import LauncherHarness

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    yield h
    h.cleanup()


def _nodes(launch, script, *extra, nproc=("2", "2"), port=None, node_timeout="15"):
    # A generous --node-timeout where losing a node is not the subject: this machine
    # is shared and heavily loaded at times.
    port = str(port or free_port())
    token = launch.dir / "job-token"  # several nodes need a shared secret
    token.write_text("multinode-test-secret\n")
    token.chmod(0o600)
    return [
        launch.popen(
            "--nnodes", "2", "--node-rank", str(n), "--master-addr", "127.0.0.1",
            "--master-port", port, "--nproc", nproc[n], "--node-timeout", node_timeout,
            "--auth-token-file", str(token), *extra, script,
        )
        for n in (0, 1)
    ]  # fmt: skip


def _finish(launch, procs, timeout=60):
    return launch.finish_all(procs, timeout=timeout)


def test_world_spans_nodes_with_uneven_nproc(launch):
    script = launch.script(
        "env.py",
        """
        import json, os
        keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT", "DISTRIB_RUN_ID"]
        print("ENV " + json.dumps({k: os.environ[k] for k in keys}))
        """,
    )
    results = _finish(launch, _nodes(launch, script, "--run-id", "shared", nproc=("1", "2")))
    envs = {}
    for code, out, err in results:
        assert code == 0, err
        for line in out.splitlines():
            m = re.fullmatch(r"\[(\d+)\]: ENV (.*)", line)
            envs[int(m.group(1))] = json.loads(m.group(2))
    assert sorted(envs) == [0, 1, 2]
    assert {e["WORLD_SIZE"] for e in envs.values()} == {"3"}
    assert [envs[r]["GROUP_RANK"] for r in range(3)] == ["0", "1", "1"]
    assert [envs[r]["LOCAL_RANK"] for r in range(3)] == ["0", "0", "1"]
    assert [envs[r]["LOCAL_WORLD_SIZE"] for r in range(3)] == ["1", "2", "2"]
    assert len({e["MASTER_PORT"] for e in envs.values()}) == 1
    assert {e["DISTRIB_RUN_ID"] for e in envs.values()} == {"shared"}


def test_failure_on_one_node_stops_both_with_the_same_root_cause(launch):
    script = launch.script(
        "fail.py",
        """
        import os, time
        open(f"up.{os.environ['RANK']}", "w").close()
        end = time.monotonic() + 20
        while not all(os.path.exists(f"up.{r}") for r in range(4)):
            assert time.monotonic() < end
            time.sleep(0.01)
        if os.environ["RANK"] == "3":
            raise ValueError("bad batch on rank 3")
        time.sleep(30)
        """,
    )
    t0 = time.monotonic()
    results = _finish(launch, _nodes(launch, script))
    assert time.monotonic() - t0 < 30
    for code, _out, err in results:
        assert code == 1
        root = err[err.index("ROOT CAUSE") :]
        assert "rank 3 (local rank 1, node 1)" in root and "ValueError: bad batch on rank 3" in root
        assert "stopped by the launcher: ranks 0, 1, 2" in err


def test_restart_happens_on_all_nodes_together(launch):
    script = launch.script(
        "flaky.py",
        """
        import os
        attempt = os.environ["DISTRIB_RESTART_COUNT"]
        print("rank", os.environ["RANK"], "attempt", attempt)
        if attempt == "0" and os.environ["RANK"] == "0":
            raise RuntimeError("transient")
        """,
    )
    results = _finish(launch, _nodes(launch, script, "--max-restarts", "2"))
    outs = ""
    for code, out, err in results:
        assert code == 0, err
        assert "restarting all workers (restart 1 of 2)" in err
        outs += out
    for rank in range(4):
        assert f"rank {rank} attempt 1" in outs


def test_launcher_killed_on_one_node_stops_the_other_with_report(launch):
    script = launch.script(
        "wait.py",
        """
        import os, time
        open(f"up.{os.environ['RANK']}", "w").write("up\\n")
        time.sleep(60)
        """,
    )
    node0, node1 = _nodes(launch, script, node_timeout="3")
    for r in range(4):
        launch.wait_for_file(f"up.{r}")
    t0 = time.monotonic()
    node1.kill()
    code, _out, err = _finish(launch, [node0])[0]
    assert code == 1
    assert time.monotonic() - t0 < 3 + 15  # --node-timeout 3
    assert "node 1's launcher sent no heartbeat" in err
    assert "stopped by the launcher: ranks 0, 1" in err


def test_auth_token_mismatch_is_refused_and_join_times_out(launch):
    (launch.dir / "good").write_text("secret-a\n")
    (launch.dir / "bad").write_text("secret-b\n")
    script = launch.script("ok.py", "print('should not run')\n")
    port = str(free_port())
    common = ["--nnodes", "2", "--master-port", port, "--join-timeout", "2"]
    node0 = launch.popen(*common, "--node-rank", "0", "--auth-token-file", "good", script)
    node1 = launch.popen(*common, "--node-rank", "1", "--auth-token-file", "bad", script)
    (c0, o0, e0), (c1, o1, e1) = _finish(launch, [node0, node1])
    assert c1 == 1 and "refused the request" in e1 and "node 1" in e1
    assert c0 == 1 and "1 of 2 nodes joined" in e0
    assert "should not run" not in o0 + o1


def test_sigint_on_one_node_ends_the_job_everywhere_without_restart(launch):
    import signal

    script = launch.script(
        "wait.py",
        """
        import os, time
        open(f"up.{os.environ['RANK']}", "w").write("up\\n")
        time.sleep(60)
        """,
    )
    node0, node1 = _nodes(launch, script, "--max-restarts", "3")
    for r in range(4):
        launch.wait_for_file(f"up.{r}")
    node1.send_signal(signal.SIGINT)
    (c0, _o0, e0), (c1, _o1, e1) = _finish(launch, [node0, node1])
    assert c1 == 128 + signal.SIGINT and "distrib-run received SIGINT" in e1
    assert c0 == 1 and "restarting" not in e0
    assert "node 1's launcher was interrupted by a signal and left" in e0, e0


def test_node_0_may_start_after_the_others(launch):
    """Node 1 starts first and finds no store; node 0 hosts it seconds later (longer
    than one store request may wait): the job runs, as pods and srun tasks start."""
    script = launch.script(
        "sum.py",
        """
        import numpy as np
        import distrib
        distrib.init_process_group()
        x = np.full(2, float(distrib.get_rank() + 1))
        distrib.all_reduce(x)
        print(f"SUM rank={distrib.get_rank()} {x[0]:g}", flush=True)
        distrib.destroy_process_group()
        """,
    )
    port = str(free_port())
    token = launch.dir / "job-token"
    token.write_text("multinode-test-secret\n")
    token.chmod(0o600)
    common = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port,
              "--nproc", "1", "--auth-token-file", str(token), "--join-timeout", "40"]  # fmt: skip
    node1 = launch.popen(*common, "--node-rank", "1", script)
    time.sleep(5.0)  # over twice the 2 s a store request waits once joined
    assert node1.poll() is None, "node 1 gave up before node 0 started"
    node0 = launch.popen(*common, "--node-rank", "0", script)
    results = _finish(launch, [node0, node1])
    for code, _, err in results:
        assert code == 0, err[-3000:]
    sums = sorted(line.split("]: ", 1)[1] for _, out, _ in results for line in out.splitlines()
                  if "SUM" in line)  # fmt: skip
    assert sums == ["SUM rank=0 3", "SUM rank=1 3"]
