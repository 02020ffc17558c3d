"""Elastic membership with the c10d rendezvous (``--nnodes MIN:MAX``), torchrun's semantics.

Three launchers run ``examples/elastic_ddp.py`` (which resumes from a
``distrib.checkpoint``) with ``--nnodes 2:3``: one is killed mid-run and the job
finishes on two with the same model as an uninterrupted run; or one starts late
and the running group re-forms at once to take it in. Each scenario runs on
127.0.0.1 and between three network-namespace hosts on a bridge (198.18.0.0/15;
needs root, skips with the reason elsewhere).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import time

import pytest
from _netns import bridged_hosts
from _util import free_port
from test_launcher_helpers import REPO, LauncherHarness

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

EXAMPLE = str(REPO / "examples" / "elastic_ddp.py")
NETNS_PORT = "29400"  # fresh namespaces: nothing else listens there


@pytest.fixture(scope="module")
def reference() -> tuple[str, list[float]]:
    """Accuracy line and weights of one uninterrupted single-process run."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(
            [sys.executable, EXAMPLE, "--checkpoint", f"{d}/ck.bin"],
            capture_output=True, text=True, timeout=60, cwd=d,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return _final(r.stdout)


def _final(text: str) -> tuple[str, list[float]]:
    m = re.search(r"final accuracy: ([\d.]+) weights: \[([^\]]*)\]", text)
    assert m, text[-3000:]
    return m.group(1), [float(v) for v in m.group(2).split(",")]


class Cluster:
    """Three launchers of one elastic job, on loopback or in namespaces."""

    def __init__(self, h: LauncherHarness, namespaces: list[str] | None, addrs: list[str]):
        self.h, self.ns, self.addrs = h, namespaces, addrs
        self.endpoint = f"{addrs[0]}:{NETNS_PORT if namespaces else free_port()}"

    def start(self, i: int, max_restarts: int) -> subprocess.Popen[str]:
        inner = [sys.executable, "-m", "launcher", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", self.endpoint, "--rdzv-id", "elastic-test",
                 "--nnodes", "2:3", "--nproc-per-node", "1", "--max-restarts", str(max_restarts),
                 "--node-timeout", "3", "--join-timeout", "60",
                 "--rdzv-conf", f"is_host={int(i == 0)},last_call_timeout=1",
                 EXAMPLE, "--checkpoint", str(self.h.dir / "ck.bin"), "--step-time", "0.05",
                 "--progress-dir", str(self.h.dir)]  # fmt: skip
        cmd = inner
        if self.ns is not None:
            cmd = ["ip", "netns", "exec", self.ns[i], "unshare", "--uts", "sh", "-c",
                   f'hostname host{i} && exec "$@"', "sh", *inner]  # fmt: skip
        p = subprocess.Popen(
            cmd, cwd=self.h.dir, env=self.h.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.h._popens.append(p)
        return p


@pytest.fixture(params=["loopback", "netns"])
def cluster(request, tmp_path):
    h = LauncherHarness(tmp_path)
    h.env["DISTRIB_TIMEOUT"] = "20"  # collectives with a dead peer give up in bounded time
    try:
        if request.param == "loopback":
            yield Cluster(h, None, ["127.0.0.1"] * 3)
        else:
            # Several hosts share a secret (as a Kubernetes Secret in every pod's env would).
            h.env["DISTRIB_AUTH_TOKEN"] = secrets.token_hex(32)
            with bridged_hosts("e", 3) as (names, addrs):
                yield Cluster(h, names, addrs)
    finally:
        h.cleanup()


def _wait_progress(c: Cluster, name: str, procs: list[subprocess.Popen[str]]) -> None:
    end = time.monotonic() + 90
    while time.monotonic() < end:
        if (c.h.dir / name).exists():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    outs = [p.communicate(timeout=30) if p.poll() is not None else ("", "") for p in procs]
    raise AssertionError(f"no {name}: {[o[1][-2000:] for o in outs]}")


def _resumes(text: str) -> list[tuple[int, int, int]]:
    pattern = r"resumed at step (\d+) with world size (\d+) \(restart count (\d+)\)"
    return [tuple(int(g) for g in m) for m in re.findall(pattern, text)]  # type: ignore[misc]


def _check_result(text: str, reference: tuple[str, list[float]]) -> None:
    acc, weights = _final(text)
    assert acc == reference[0]
    assert weights == pytest.approx(reference[1], abs=2e-6)


def test_lost_node_job_finishes_on_two(cluster, reference):
    first = cluster.start(0, max_restarts=2)
    time.sleep(0.5)  # node 0 serves the rendezvous store
    others = [cluster.start(i, max_restarts=2) for i in (1, 2)]
    _wait_progress(cluster, "step_40_world_3", [first, *others])
    others[1].kill()  # host 2 dies mid-run (its guardian takes its workers down)
    results = cluster.h.finish_all([first, others[0]], timeout=120)
    for rc, _, err in results:
        assert rc == 0, err[-4000:]
    out = "".join(o for _, o, _ in results)
    err = "".join(e for _, _, e in results)
    assert "2 node(s) remain" in err
    resumes = _resumes(out)
    assert resumes[0] == (0, 3, 0)
    step, world, restarts = resumes[-1]
    assert world == 2 and restarts == 1 and step >= 40  # resumed from its checkpoint
    assert (cluster.h.dir / "step_200_world_2").exists()
    _check_result(out, reference)


def test_late_node_grows_the_group(cluster, reference):
    first = cluster.start(0, max_restarts=0)
    time.sleep(0.5)
    second = cluster.start(1, max_restarts=0)
    _wait_progress(cluster, "step_40_world_2", [first, second])
    third = cluster.start(2, max_restarts=0)  # joins while the job runs
    results = cluster.h.finish_all([first, second, third], timeout=120)
    for rc, _, err in results:
        assert rc == 0, err[-4000:]
    out = "".join(o for _, o, _ in results)
    err = "".join(e for _, _, e in results)
    assert "re-forming the group (not counted as a restart)" in err
    resumes = _resumes(out)
    assert resumes[0] == (0, 2, 0)
    step, world, restarts = resumes[-1]
    assert world == 3 and restarts == 0 and step >= 40
    assert (cluster.h.dir / "step_200_world_3").exists()
    _check_result(out, reference)


def test_too_few_nodes_left_is_a_failure(tmp_path):
    """--nnodes 2:2 loses a node: fewer than MIN remain, so the job stops with the reason."""
    h = LauncherHarness(tmp_path)
    h.env["DISTRIB_TIMEOUT"] = "20"
    try:
        c = Cluster(h, None, ["127.0.0.1"] * 2)
        procs = []
        for i in (0, 1):
            inner = [sys.executable, "-m", "launcher", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", c.endpoint, "--nnodes", "2", "--max-restarts", "3",
                     "--node-timeout", "3", "--rdzv-conf", f"is_host={1 - i}",
                     EXAMPLE, "--checkpoint", str(tmp_path / "ck.bin"), "--step-time", "0.05",
                     "--progress-dir", str(tmp_path)]  # fmt: skip
            procs.append(
                subprocess.Popen(inner, cwd=tmp_path, env=h.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            )  # fmt: skip
            h._popens.append(procs[-1])
            time.sleep(0.3)
        _wait_progress(c, "step_20_world_2", procs)
        procs[1].kill()
        rc, _out, err = h.finish_all([procs[0]], timeout=90)[0]
        assert rc == 1
        assert "1 node(s) remain, --nnodes needs 2" in err, err[-3000:]
    finally:
        h.cleanup()
