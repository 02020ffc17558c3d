"""distrib scripts run unchanged under real torchrun (torch 2.13): its agent serves the store.

torchrun's agent already listens on ``MASTER_PORT`` and tells workers with
``TORCHELASTIC_USE_AGENT_STORE=True``; distrib ranks become clients of that c10d
store (``distrib.store._torch_store``). torchrun is run as ``python -m
torch.distributed.run`` with this interpreter, so its workers import this
checkout's distrib. Covers: standalone, static rendezvous over two launchers,
c10d rendezvous over two launchers, a restart after a failure (keys of the
failed attempt are not reused), ``ddp_digits.py`` to its accuracy, and the
protocol client against torch's own server (libuv and classic backends).
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import time

import pytest
from _util import free_port
from test_launcher_helpers import REPO, LauncherHarness

from distrib._errors import DistStoreError, DistTimeoutError
from distrib.store._torch_store import TorchTCPStoreClient, torchelastic_store

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

try:
    import torch
    import torch.distributed as torch_dist
except ImportError:  # CI installs torch==2.13.0 (CPU); say so instead of skipping
    torch = None  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _need_torch():
    if torch is None:
        pytest.fail("these tests need torch 2.13.0 (CPU): pip install torch==2.13.0")


class TorchrunHarness(LauncherHarness):
    """``LauncherHarness`` whose command is torchrun (``python -m torch.distributed.run``)."""

    def cmd(self, *args: str, python: str | None = None) -> list[str]:
        return [python or sys.executable, "-m", "torch.distributed.run", *args]


@pytest.fixture
def trun(tmp_path):
    h = TorchrunHarness(tmp_path)
    h.env["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    yield h
    h.cleanup()


ALLREDUCE = """
    import os, sys
    import numpy as np
    import distrib.comm as dist

    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    x = np.full(4, float(rank + 1))
    dist.all_reduce(x)
    dist.barrier()
    if rank == 1 and restart < int(os.environ.get("FAIL_UNTIL", "0")):
        sys.exit(3)  # after the first attempt's keys are in the store
    dist.barrier()  # the others wait here for the failed rank until torchrun stops them
    sys.stdout.write(f"RESULT rank={rank} world={world} restart={restart} sum={x[0]:g}\\n")
    sys.stdout.flush()
    dist.destroy_process_group()
"""


def _results(text: str) -> list[str]:
    # torchrun's workers share one console, so lines can run into each other
    return sorted(re.findall(r"RESULT rank=\d+ world=\d+ restart=\d+ sum=\d+", text))


def _expected(world: int, restart: int = 0) -> list[str]:
    total = world * (world + 1) // 2
    return sorted(
        f"RESULT rank={r} world={world} restart={restart} sum={total}" for r in range(world)
    )


# -- the protocol client against torch's own server ------------------------------


@pytest.mark.parametrize("libuv", [True, False], ids=["libuv", "classic"])
def test_client_speaks_torch_tcpstore_protocol(libuv):
    server = torch_dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        use_libuv=libuv,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=10),
    )
    c = TorchTCPStoreClient("127.0.0.1", server.port, timeout=5)
    try:
        c.set("a", b"hello")
        assert server.get("a") == b"hello"  # same key space as torch's own clients
        server.set("b", "x")
        assert c.get("b") == b"x"
        assert c.add("n", 3) == 3 and server.add("n", 2) == 5 and c.add("n", 0) == 5
        assert c.check(["a", "b"]) and not c.check(["a", "missing"])
        assert c.check([]) and c.multi_get([]) == []
        c.wait([])
        assert c.compare_set("cs", b"", b"v1") == b"v1"
        assert c.compare_set("cs", b"other", b"v2") == b"v1"
        assert c.compare_set("cs", b"v1", b"v2") == b"v2"
        assert c.multi_get(["a", "missing", "b"]) == [b"hello", None, b"x"]
        t0 = time.monotonic()
        with pytest.raises(DistTimeoutError, match="did not appear"):
            c.wait(["never"], timeout=0.3)
        assert time.monotonic() - t0 < 5
        c.set("after", b"1")  # the cancelled wait left the connection in step
        assert c.get("after") == b"1"
        assert c.num_keys() == server.num_keys()
        assert c.delete_key("a") and not c.delete_key("a")
        clone = c.clone()
        assert clone.get("b") == b"x"
        clone.close()
    finally:
        c.close()
        del server


def test_client_refuses_what_is_not_a_torch_store():
    import socket

    with socket.socket() as listener:  # accepts, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        c = TorchTCPStoreClient("127.0.0.1", listener.getsockname()[1], timeout=0.5)
        with pytest.raises(DistStoreError, match="handshake"):
            c.set("k", b"v")
    with pytest.raises(DistTimeoutError, match="cannot connect"):
        TorchTCPStoreClient("127.0.0.1", free_port(), timeout=0.5).set("k", b"v")


def test_agent_store_only_with_torchelastic_flag():
    assert torchelastic_store({"TORCHELASTIC_RUN_ID": "x"}, "127.0.0.1", 1, 1.0) is None


# -- real torchrun ------------------------------------------------------------------


def test_standalone(trun):
    script = trun.script("train.py", ALLREDUCE)
    r = trun.run("--standalone", "--nproc-per-node", "2", script, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _results(r.stdout) == _expected(2)


def test_standalone_underscore_spelling_and_fixed_master_port(trun):
    script = trun.script("train.py", ALLREDUCE)
    r = trun.run(
        "--nnodes=1", "--nproc_per_node=3", "--master_port", str(free_port()), script, timeout=180
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _results(r.stdout) == _expected(3)


def test_static_rendezvous_two_launchers(trun):
    script = trun.script("train.py", ALLREDUCE)
    port = str(free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    procs = [
        trun.popen(*common, "--node-rank", str(n), "--master-port", port, script) for n in (0, 1)
    ]
    results = trun.finish_all(procs, timeout=180)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert _results("".join(out for _, out, _ in results)) == _expected(4)


def test_c10d_rendezvous_two_launchers(trun):
    script = trun.script("train.py", ALLREDUCE)
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d"]
    common += ["--rdzv-endpoint", endpoint, "--rdzv-id", "job1"]
    first = trun.popen(*common, "--rdzv-conf", "is_host=1", script)
    second = trun.popen(*common, "--rdzv_conf", "is_host=0", script)
    results = trun.finish_all([first, second], timeout=180)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert _results("".join(out for _, out, _ in results)) == _expected(4)


def test_restart_after_failure_uses_fresh_keys(trun):
    script = trun.script("train.py", ALLREDUCE)
    trun.env["FAIL_UNTIL"] = "1"
    r = trun.run("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", script)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _results(r.stdout) == _expected(2, restart=1)


def test_c10d_restart_across_two_launchers(trun):
    script = trun.script("train.py", ALLREDUCE)
    trun.env["FAIL_UNTIL"] = "2"
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    common += ["--rdzv-endpoint", endpoint, "--rdzv-id", "job2", "--max-restarts", "2"]
    procs = [trun.popen(*common, "--rdzv-conf", f"is_host={h}", script) for h in (1, 0)]
    results = trun.finish_all(procs, timeout=200)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert _results("".join(out for _, out, _ in results)) == _expected(2, restart=2)


def test_ddp_digits_reaches_its_accuracy(trun):
    example = os.path.join(REPO, "examples", "ddp_digits.py")
    r = trun.run(
        "--standalone", "--nproc-per-node", "2", example, "--no-plot", "--no-progress",
        "--batch-size", "64", timeout=220,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = re.search(r"test accuracy: ([\d.]+)", r.stdout)
    assert m and float(m.group(1)) >= 0.95, r.stdout[-2000:]


def test_agent_store_keys_are_namespaced_per_restart_and_round():
    server = torch_dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=10),
    )  # fmt: skip
    env = {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RUN_ID": "job7",
        "TORCHELASTIC_RESTART_COUNT": "1",
        "WORLD_SIZE": "2",
    }
    try:
        store = torchelastic_store(env, "127.0.0.1", server.port, 5.0)
        assert store is not None
        store.set("k", b"static")  # no c10d rounds in the store (static rendezvous)
        assert server.get("distrib/job7/1/-/2/k") == b"static"
        store.close()
        # c10d: torchrun's agents record each round's rank assignment; ours is the last
        for rnd in (0, 1, 2):
            server.set(f"torch.rendezvous.job7.{rnd}/torchelastic/assigned_ranks/0", "[0,2,0,2]")
        store = torchelastic_store(env, "127.0.0.1", server.port, 5.0)
        assert store is not None
        store.set("k", b"round2")
        assert server.get("distrib/job7/1/2/2/k") == b"round2"
        store.close()
    finally:
        del server


@pytest.mark.netns
def test_c10d_between_two_namespace_hosts(trun):
    """Two torchrun launchers on two network-namespace hosts (198.18.0.1/.2), real TCP."""
    from _netns import ADDR, PORT, two_hosts

    script = trun.script("train.py", ALLREDUCE)
    with two_hosts("t") as (ns, _links):
        procs = []
        for node in (0, 1):
            inner = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                     "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"{ADDR[0]}:{PORT}", "--rdzv-id", "netns",
                     "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", ADDR[node],
                     script]  # fmt: skip
            cmd = ["ip", "netns", "exec", ns[node], *inner]
            p = subprocess.Popen(
                cmd, cwd=trun.dir, env=trun.env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            trun._popens.append(p)
            procs.append(p)
        results = trun.finish_all(procs, timeout=180)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert _results("".join(out for _, out, _ in results)) == _expected(4)
