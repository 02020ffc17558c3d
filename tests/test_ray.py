"""distrib on Ray: a real Ray cluster of two nodes on this machine (ray.cluster_utils).

Both Ray nodes run on 127.0.0.1, so ranks on different nodes must still take the
ZeroMQ ring between them (Ray's node id, not the hostname, decides); every test
checks that no actor, placement group, rank process or /dev/shm entry is left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import psutil
import pytest

# Ray stays on loopback: tests/conftest.py sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# before any test module can import Ray (it reads the variable at import).
ray = pytest.importorskip("ray", reason="CI installs ray (pip install '.[ray]')")
cloudpickle = pytest.importorskip("cloudpickle")

import distrib  # noqa: E402
import distrib.ray  # noqa: E402

# Functions below are shipped to the ranks by value (Ray workers cannot import tests/).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHM = "/dev/shm"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(long_lived_pids):
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": False,
            "object_store_memory": 100 * 2**20,
            "node_ip_address": "127.0.0.1",
        },
    )
    try:
        c.worker = c.add_node(  # type: ignore[attr-defined]
            num_cpus=2, object_store_memory=100 * 2**20, node_ip_address="127.0.0.1"
        )
        ray.init(address=c.address, log_to_driver=False)
        mine = {p.pid for p in psutil.Process().children(recursive=True)}
        long_lived_pids.update(mine)
        yield c
        mine |= {p.pid for p in psutil.Process().children(recursive=True)}
    finally:
        ray.shutdown()
        c.shutdown()
        long_lived_pids.difference_update(mine)


def _our_shm() -> set[str]:
    """distrib's named segments (``distrib_<pid>_<id>``) made by our ranks.

    Other suites may run on this machine at the same time: a segment of a live
    process that is not ours is theirs. (The ranks' own collective segments are
    anonymous memfds: they never appear here, even after kill -9.)
    """
    try:
        names = os.listdir(_SHM)
    except FileNotFoundError:
        return set()
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    out = set()
    for name in names:
        m = re.match(r"distrib_(\d+)_", name)
        if m and (int(m.group(1)) in ours or not psutil.pid_exists(int(m.group(1)))):
            out.add(name)
    return out


def _rank_processes() -> list[psutil.Process]:
    """Processes started by distrib.ray (only it sets DISTRIB_NODE_ID)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or ())
            if ("distrib.ray._child" in cmd or "launcher._bootstrap" in cmd) and (
                "DISTRIB_NODE_ID" in p.environ()
            ):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _live_actors() -> list[Any]:
    from ray._private import state

    return [a for a in state.actors().values() if a.get("State") not in ("DEAD",)]


def _live_groups() -> list[Any]:
    return [g for g in ray.util.placement_group_table().values() if g.get("state") != "REMOVED"]


@pytest.fixture
def clean(cluster):
    """After the test: no actor, placement group, rank process or /dev/shm entry left."""
    shm_before = _our_shm()
    yield cluster
    end = time.monotonic() + 10
    while time.monotonic() < end and (_live_actors() or _rank_processes()):
        time.sleep(0.1)
    assert not _live_actors(), _live_actors()
    assert not _live_groups(), _live_groups()
    assert not _rank_processes(), [p.info["cmdline"] for p in _rank_processes()]
    assert not (_our_shm() - shm_before)


def _api() -> Any:
    from distrib.comm import _api

    return _api


def _engine_name() -> str:
    eng = _api()._require("test").group.cpu_engine
    if type(eng).__name__ == "HierEngine":
        return f"HierEngine(lead={type(eng._leaders).__name__ if eng._leaders else None})"
    return type(eng).__name__


# ---------------------------------------------------------------- ranks in the functions


def _collectives(n_elems: int) -> dict[str, Any]:
    distrib.init_process_group()
    rank, world = distrib.get_rank(), distrib.get_world_size()
    rng = np.random.default_rng(rank)
    x = rng.standard_normal(n_elems).astype(np.float32)
    mine = x.copy()
    distrib.all_reduce(x)
    b = np.arange(5, dtype=np.int64) * (rank + 1)
    distrib.broadcast(b, src=world - 1)
    gathered = [np.empty(3, np.float64) for _ in range(world)]
    distrib.all_gather(gathered, np.full(3, float(rank)))
    mx = np.array([rank], dtype=np.int32)
    distrib.all_reduce(mx, op=distrib.ReduceOp.MAX)
    out = {
        "rank": rank,
        "env": {k: os.environ[k] for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")},
        "node": os.environ["DISTRIB_NODE_ID"],
        "token": bool(os.environ.get("DISTRIB_AUTH_TOKEN")),
        "engine": _engine_name(),
        "hosts": len(set(_api()._require("test").group._ctx.host_ids)),
        "mine": mine,
        "sum": x,
        "bcast": b,
        "gathered": np.stack(gathered),
        "max": int(mx[0]),
    }
    print(f"rank {rank} of {world} done")
    distrib.destroy_process_group()
    return out


def _raise_on_rank_1() -> None:
    distrib.init_process_group()
    if distrib.get_rank() == 1:
        raise ValueError("boom on rank 1")
    distrib.barrier()


def _kill_own_actor_mid_collective() -> None:
    distrib.init_process_group(timeout=60)
    x = np.ones(1 << 20, np.float32)
    for i in range(10_000):
        if distrib.get_rank() == 1 and i == 3:
            os.kill(os.getppid(), signal.SIGKILL)  # the Ray actor that hosts this rank
        distrib.all_reduce(x)


def _sigkill_self() -> None:
    distrib.init_process_group()
    if distrib.get_rank() == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    distrib.barrier()


def _fail_first_attempt() -> tuple[int, str]:
    distrib.init_process_group()
    attempt = os.environ["DISTRIB_RESTART_COUNT"]
    if attempt == "0" and distrib.get_rank() == 1:
        sys.exit(3)
    x = np.array([1.0])
    distrib.all_reduce(x)
    distrib.destroy_process_group()
    return int(x[0]), attempt


def _hang() -> None:
    time.sleep(600)


# ---------------------------------------------------------------- tests


def test_collectives_across_two_nodes_use_the_zmq_ring(clean):
    n = 100_003
    res = distrib.ray.run(_collectives, num_workers=4, placement="SPREAD", args=(n,), timeout=120)
    assert [r["rank"] for r in res] == [0, 1, 2, 3]
    mine = np.stack([r["mine"] for r in res])
    for r in res:
        np.testing.assert_allclose(r["sum"], mine.sum(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(r["bcast"], np.arange(5) * 4)
        np.testing.assert_array_equal(r["gathered"], np.repeat(np.arange(4.0)[:, None], 3, 1))
        assert r["max"] == 3 and r["token"]
    nodes = [r["node"] for r in res]
    assert {r["hosts"] for r in res} == {2}  # one machine, yet two hosts to distrib
    assert len(set(nodes)) == 2 and nodes[0] == nodes[1] and nodes[2] == nodes[3]
    # two ranks per Ray node: shared memory inside a node, the ZeroMQ ring between them
    assert {r["engine"] for r in res} == {"HierEngine(lead=ZmqEngine)", "HierEngine(lead=None)"}
    assert [r["engine"] for r in res][::2] == ["HierEngine(lead=ZmqEngine)"] * 2
    assert [r["env"]["LOCAL_RANK"] for r in res] == ["0", "1", "0", "1"]
    assert [r["env"]["GROUP_RANK"] for r in res] == ["0", "0", "1", "1"]
    assert {r["env"]["LOCAL_WORLD_SIZE"] for r in res} == {"2"}


def test_one_rank_per_node_is_a_flat_zmq_ring(clean):
    res = distrib.ray.run(_collectives, num_workers=2, placement="STRICT_SPREAD", args=(1000,))
    assert {r["engine"] for r in res} == {"ZmqEngine"}  # no shared memory: the ZeroMQ ring
    assert res[0]["node"] != res[1]["node"] and res[0]["hosts"] == 2
    np.testing.assert_allclose(res[0]["sum"], res[0]["mine"] + res[1]["mine"], rtol=1e-6)


def test_one_node_uses_shared_memory_and_prefixes_output(clean, capsys):
    res = distrib.ray.run(_collectives, num_workers=2, placement="STRICT_PACK", args=(1000,))
    assert {r["engine"] for r in res} == {"ShmEngine"} and res[0]["hosts"] == 1
    out = capsys.readouterr().out
    assert "[0]: rank 0 of 2 done" in out and "[1]: rank 1 of 2 done" in out


def test_a_rank_that_raises_stops_the_job_with_one_report(clean, capsys):
    t0 = time.monotonic()
    with pytest.raises(distrib.DistError) as info:
        distrib.ray.run(_raise_on_rank_1, num_workers=4, placement="SPREAD", timeout=120)
    assert time.monotonic() - t0 < 60
    err = info.value
    text = str(err)
    assert err.rank == 1
    root = text[text.index("ROOT CAUSE") :]
    assert "rank 1 (local rank 1, node 0)" in root and "Ray node" in root
    assert "exit code 1" in root and "ValueError: boom on rank 1" in root
    assert "[1]: ValueError: boom on rank 1" in capsys.readouterr().err


def _rank_1_raises_the_others_sleep(stamp: str) -> None:
    if os.environ["RANK"] == "1":
        with open(stamp, "w") as f:
            f.write(repr(time.time()))
        raise ValueError("boom on rank 1")
    time.sleep(300)  # outside any collective: only the driver's stop ends it


def test_stop_reaches_a_rank_while_its_actor_waits_in_a_poll(clean, monkeypatch, tmp_path):
    # An idle poll blocks in its actor for this long; the driver's stop must not
    # queue behind it (it did before actors took concurrent calls: ~25 s here,
    # SIGKILL escalation and all, instead of ~1 s).
    monkeypatch.setattr(distrib.ray._job, "_IDLE_POLL_S", 150.0)
    stamp = str(tmp_path / "failed_at")
    with pytest.raises(distrib.DistError) as info:
        distrib.ray.run(_rank_1_raises_the_others_sleep, num_workers=3, args=(stamp,), timeout=170)
    with open(stamp) as f:
        assert time.time() - float(f.read()) < 10
    assert info.value.rank == 1
    assert "ValueError: boom on rank 1" in str(info.value)


def test_an_actor_killed_mid_collective_is_named_within_the_timeout(clean):
    t0 = time.monotonic()
    with pytest.raises(distrib.DistError) as info:
        distrib.ray.run(_kill_own_actor_mid_collective, num_workers=4, placement="SPREAD",
                        timeout=90)  # fmt: skip
    assert time.monotonic() - t0 < 60  # the collective timeout is 60 s, the job's 90 s
    text = str(info.value)
    root = text[text.index("ROOT CAUSE") :]
    assert info.value.rank == 1
    assert "rank 1 (local rank 1, node 0)" in root and "Ray actor died" in root


def test_a_rank_killed_by_a_signal_is_reported_by_name(clean):
    with pytest.raises(distrib.DistError) as info:
        distrib.ray.run(_sigkill_self, num_workers=4, placement="SPREAD", timeout=90)
    text = str(info.value)
    root = text[text.index("ROOT CAUSE") :]
    assert "rank 2 (local rank 0, node 1)" in root and "killed by SIGKILL" in root


def test_max_restarts_restarts_the_whole_group(clean, capsys):
    res = distrib.ray.run(_fail_first_attempt, num_workers=3, max_restarts=1, timeout=120)
    assert res == [(3, "1")] * 3
    err = capsys.readouterr().err
    assert re.search(r"attempt 1 failed \(rank 1 on host .*: exit code 3\); restarting the whole "
                     r"group \(restart 1 of 1\)", err), err  # fmt: skip


def test_timeout_stops_a_hung_job(clean):
    t0 = time.monotonic()
    with pytest.raises(distrib.DistError, match=r"timed out.*timeout=6 s"):
        distrib.ray.run(_hang, num_workers=2, timeout=6)
    assert time.monotonic() - t0 < 40


def test_placement_that_cannot_be_met_fails_with_the_request(clean):
    with pytest.raises(distrib.DistError, match=r"could not place 3 worker"):
        distrib.ray.run(_hang, num_workers=3, placement="STRICT_SPREAD", timeout=3)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"num_workers": 0}, ValueError, "num_workers must be >= 1"),
        ({"num_workers": 2.0}, TypeError, "num_workers must be an int"),
        ({"num_workers": True}, TypeError, "num_workers must be an int"),
        ({"num_workers": 2, "placement": "DIAGONAL"}, ValueError, "placement must be one of"),
        ({"num_workers": 2, "placement": None}, ValueError, "placement must be one of"),
        ({"num_workers": 2, "cpus_per_worker": -1}, ValueError, "cpus_per_worker"),
        ({"num_workers": 2, "cpus_per_worker": float("nan")}, ValueError, "cpus_per_worker"),
        ({"num_workers": 2, "gpus_per_worker": float("inf")}, ValueError, "gpus_per_worker"),
        ({"num_workers": 2, "cpus_per_worker": 0}, ValueError, "both 0"),
        ({"num_workers": 2, "max_restarts": -1}, ValueError, "max_restarts must be >= 0"),
        ({"num_workers": 2, "timeout": 0}, ValueError, "timeout must be a finite number > 0"),
        ({"num_workers": 2, "timeout": float("inf")}, ValueError, "timeout"),
        ({"num_workers": 2, "timeout": "10"}, TypeError, "timeout must be a number"),
        ({"num_workers": 2, "env": {"RANK": "3"}}, ValueError, "env sets RANK"),
        ({"num_workers": 2, "env": {"X": 1}}, TypeError, "env must map str to str"),
        ({"num_workers": 2, "args": 5}, TypeError, "args must be a tuple or list"),
        ({"num_workers": 2, "kwargs": [1]}, TypeError, "kwargs must be a mapping"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        distrib.ray.run(_hang, **kwargs)


def test_unknown_distrib_variable_in_env_is_refused():
    with pytest.raises(distrib.DistError, match="DISTRIB_TIMOUT"):
        distrib.ray.run(_hang, num_workers=2, env={"DISTRIB_TIMOUT": "5"})
    with pytest.raises(TypeError, match="fn must be callable"):
        distrib.ray.run(42, num_workers=2)  # type: ignore[arg-type]


# ---------------------------------------------------------------- distrib-run --ray


_SCRIPT = """
import os, sys
import numpy as np
import distrib
distrib.init_process_group()
x = np.array([float(distrib.get_rank())])
distrib.all_reduce(x)
print(f"sum={x[0]:g} args={sys.argv[1:]} local={os.environ['LOCAL_RANK']}")
if "--fail" in sys.argv and distrib.get_rank() == 2:
    raise RuntimeError("script failed on rank 2")
distrib.destroy_process_group()
"""


def _distrib_run(args: list[str], env_extra: dict[str, str], timeout: float = 120):
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_distrib_run_ray_runs_a_script_on_the_cluster(clean, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    r = _distrib_run(["--ray", clean.address, "--nproc", "4", str(script), "a", "b"], {})
    assert r.returncode == 0, r.stderr[-3000:]
    for k in range(4):
        assert re.search(rf"^\[{k}\]: sum=6 args=\['a', 'b'\] local=\d$", r.stdout, re.M)
    # RAY_ADDRESS works as well as an explicit address; a failure is reported, exit 1
    r = _distrib_run(
        ["--ray", "--nproc", "4", str(script), "--fail"], {"RAY_ADDRESS": clean.address}
    )
    assert r.returncode == 1
    assert "ROOT CAUSE" in r.stderr and "rank 2" in r.stderr
    assert "RuntimeError: script failed on rank 2" in r.stderr


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--nnodes", "2"], "--nnodes"),
        (["--master-port", "29500"], "--master-port"),
        (["--master-addr", "10.0.0.1"], "--master-addr"),
        (["--node-rank", "1"], "--node-rank"),
        (["--standalone"], "--standalone"),
        (["--log-dir", "/tmp/x"], "--log-dir"),
        (["--tee", "3"], "--tee"),
        (["--max-restarts", "-1"], "--max-restarts"),
        (["--timeout", "0"], "--timeout"),
        (["--nproc", "zero"], "--nproc"),
    ],
)
def test_distrib_run_ray_refuses_bad_or_local_only_flags(flags, named):
    # no cluster is contacted: the flags are refused first (Ray at 127.0.0.1:9 does not exist)
    r = _distrib_run(["--ray", "127.0.0.1:9", *flags, "x.py"], {}, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert named in r.stderr.splitlines()[-1]


def test_node_id_splits_the_host_identity(monkeypatch):
    from distrib.comm._group import host_id

    monkeypatch.delenv("DISTRIB_NODE_ID", raising=False)
    machine = host_id()
    monkeypatch.setenv("DISTRIB_NODE_ID", "node-a")
    a = host_id()
    monkeypatch.setenv("DISTRIB_NODE_ID", "node-b")
    b = host_id()
    assert a != b and a.startswith(machine) and b.startswith(machine)


@pytest.mark.slow
def test_distrib_run_ray_starts_a_local_instance(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [sys.executable, "-m", "launcher", "--nproc", "2", "--ray", str(script)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[1]: sum=1 args=[] local=1" in r.stdout


def test_distrib_run_without_ray_never_imports_ray(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("print('ok')\n")
    code = (
        "import sys; from launcher._cli import main; rc = main(['--nproc', '2', sys.argv[1]]); "
        "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(script)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "[1]: ok" in r.stdout


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["--ray", "t.py", "a"], ["--ray=", "t.py", "a"]),
        (["--nproc", "2", "--ray", "t.py"], ["--nproc", "2", "--ray=", "t.py"]),
        (["--ray", "10.0.0.1:6379", "t.py"], ["--ray", "10.0.0.1:6379", "t.py"]),
        (["--ray", "ray://head:10001", "t.py"], ["--ray", "ray://head:10001", "t.py"]),
        (["--ray", "auto", "t.py"], ["--ray", "auto", "t.py"]),
        (["--ray", "--nproc", "2", "t.py"], ["--ray", "--nproc", "2", "t.py"]),
        (["-m", "--ray", "pkg.mod"], ["-m", "--ray=", "pkg.mod"]),
        (["t.py", "--ray", "x"], ["t.py", "--ray", "x"]),  # the script's own flag
    ],
)
def test_ray_flag_tells_an_address_from_the_script(argv, want):
    from launcher._ray import split_ray_address

    assert split_ray_address(argv) == want


def test_ranks_are_contiguous_per_ray_node_in_bundle_order():
    from distrib.ray._layout import ActorInfo, assign_ranks

    infos = [ActorInfo(n, "127.0.0.1", "h", i) for i, n in enumerate("BABCA")]
    slots = assign_ranks(infos)
    assert [s.actor for s in slots] == [0, 2, 1, 4, 3]  # node B first, then A, then C
    assert [(s.group_rank, s.local_rank, s.local_world_size) for s in slots] == [
        (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2), (2, 0, 1)
    ]  # fmt: skip
    assert {s.group_world_size for s in slots} == {3}


# ---------------------------------------------------------------- the example


@pytest.mark.slow
def test_ray_ddp_example_matches_one_process_accuracy(clean):
    def acc(cmd: list[str], env: dict[str, str]) -> float:
        r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **env), capture_output=True,
                           text=True, timeout=170)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        m = re.search(r"test accuracy: ([\d.]+)", r.stdout)
        assert m, r.stdout[-2000:]
        return float(m.group(1))

    ex = os.path.join(REPO, "examples")
    common = ["--no-plot", "--no-progress", "--epochs", "10", "--batch-size", "64"]
    on_ray = acc([sys.executable, os.path.join(ex, "ray_ddp.py"), *common],
                 {"RAY_ADDRESS": clean.address})  # fmt: skip
    alone = acc([sys.executable, os.path.join(ex, "ddp_digits.py"), "--nproc", "1", *common], {})
    assert on_ray == alone and on_ray >= 0.9


# ---------------------------------------------------------------- node loss (runs last)


def _loop_until_stopped(marker_dir: str) -> None:
    distrib.init_process_group(timeout=60)
    open(os.path.join(marker_dir, os.environ["RANK"]), "w").close()
    x = np.ones(1 << 16, np.float32)
    for _ in range(100_000):
        distrib.all_reduce(x)
        time.sleep(0.01)


def test_a_lost_node_stops_the_job_and_names_it(clean, tmp_path):
    import threading

    box: dict[str, BaseException] = {}

    def job() -> None:
        try:
            distrib.ray.run(_loop_until_stopped, num_workers=4, placement="SPREAD",
                            args=(str(tmp_path),), timeout=120)  # fmt: skip
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=job)
    t.start()
    end = time.monotonic() + 90
    while len(os.listdir(tmp_path)) < 4 and time.monotonic() < end and t.is_alive():
        time.sleep(0.1)
    assert len(os.listdir(tmp_path)) == 4, box
    t0 = time.monotonic()
    lost = clean.worker.node_id
    clean.remove_node(clean.worker)  # the second Ray node goes away with ranks 2 and 3
    t.join(120)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 60
    exc = box.get("exc")
    assert isinstance(exc, distrib.DistError), exc
    text = str(exc)
    root = text[text.index("ROOT CAUSE") :]
    assert f"Ray node {lost[:12]}" in root and "its Ray node was lost" in root, text
