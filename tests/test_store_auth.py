"""The store is authenticated by default, and under distrib-run it outlives rank 0."""

from __future__ import annotations

import os
import re
import stat
import types
import warnings

import msgpack
import pytest
from _util import free_port
from test_launcher_helpers import LauncherHarness

import distrib
from distrib.comm import TCPStore
from distrib.comm._group import ProcessGroup
from distrib.store import _auth as auth

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def launch(tmp_path):
    h = LauncherHarness(tmp_path)
    yield h
    h.cleanup()


WORKER = """
import hashlib, os
import numpy as np
import distrib as dist
from distrib.comm import TCPStore

token = os.environ["DISTRIB_AUTH_TOKEN"]
print("TOKEN", len(token), hashlib.sha256(token.encode()).hexdigest()[:16], flush=True)
dist.init_process_group()
x = np.ones(4)
dist.all_reduce(x)
assert x[0] == dist.get_world_size()
host, port = os.environ["DISTRIB_STORE_ADDR"].rsplit(":", 1)
del os.environ["DISTRIB_AUTH_TOKEN"]
outsider = TCPStore(host, int(port), timeout=5)
try:
    outsider.set("/worker/attempt_0/failed", b"forged")
    print("FORGED", flush=True)
except dist.DistAuthError as exc:
    print("REFUSED", "DISTRIB_AUTH_TOKEN" in str(exc), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_distrib_run_workers_get_a_per_job_secret_and_outsiders_are_refused(launch):
    script = launch.script("w.py", WORKER)
    hashes = []
    for _ in range(2):
        r = launch.run("--nproc", "2", script)
        assert r.returncode == 0, r.stderr
        tokens = set(re.findall(r"TOKEN (\d+) (\w+)", r.stdout))
        assert len(tokens) == 1, r.stdout  # one secret per job, shared by its workers
        (length, digest) = tokens.pop()
        assert int(length) >= 32
        hashes.append(digest)
        assert r.stdout.count("REFUSED True") == 2 and "FORGED" not in r.stdout, r.stdout
        assert "DISTRIB_AUTH_TOKEN" not in r.stderr.replace("DISTRIB_AUTH_TOKEN)", "")
    assert hashes[0] != hashes[1]  # a fresh secret for every job


RANK0_DIES = """
import os, signal, time
import distrib as dist
from distrib.comm import TCPStore

if os.environ["RANK"] == "1":  # read after the launcher starts stopping us
    signal.signal(signal.SIGTERM, lambda *a: None)
dist.init_process_group()
rank = dist.get_rank()
host, port = os.environ["DISTRIB_STORE_ADDR"].rsplit(":", 1)
store = TCPStore(host, int(port), timeout=10)
if rank == 0:
    store.set("pid0", str(os.getpid()))
    store.set("why", b"rank 0 ran out of data")
    store.wait(["ready1"])  # rank 1 is past its start-up
    os._exit(3)
store.set("ready1", b"1")
store.wait(["why"])
pid0 = int(store.get("pid0"))
end = time.monotonic() + 20
while time.monotonic() < end:  # until rank 0 is gone for sure
    try:
        os.kill(pid0, 0)
    except OSError:
        break
    time.sleep(0.01)
time.sleep(0.3)
print("SURVIVOR READ", store.get("why").decode(), flush=True)
store.set("after", b"1")
print("SURVIVOR WROTE", store.get("after").decode(), flush=True)
"""


def test_store_outlives_rank0_under_distrib_run(launch):
    script = launch.script("r.py", RANK0_DIES)
    r = launch.run("--nproc", "2", "--grace-period", "10", script)
    assert r.returncode == 1
    assert "[1]: SURVIVOR READ rank 0 ran out of data" in r.stdout, (r.stdout, r.stderr)
    assert "[1]: SURVIVOR WROTE 1" in r.stdout


def test_several_nodes_without_a_secret_are_refused_with_the_fix(launch):
    script = launch.script("ok.py", "print('should not run')\n")
    port = str(free_port())
    for env_token in (None, ""):
        if env_token is not None:
            launch.env["DISTRIB_AUTH_TOKEN"] = env_token
        # another host's address (198.18.0.0/15, never contacted: refused before any traffic)
        r = launch.run(
            "--nnodes", "2", "--node-rank", "0", "--master-addr", "198.18.0.1",
            "--master-port", port, script,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        for needed in ("--nnodes 2", "--auth-token-file", "DISTRIB_AUTH_TOKEN", "--insecure-store"):
            assert needed in r.stderr, r.stderr
        assert "should not run" not in r.stdout


def test_several_nodes_with_insecure_store_run(launch):
    script = launch.script(
        "ar.py",
        "import numpy as np\nimport distrib as dist\ndist.init_process_group()\n"
        "x = np.ones(3)\ndist.all_reduce(x)\nprint('sum', x[0])\ndist.destroy_process_group()\n",
    )
    port = str(free_port())
    procs = [
        launch.popen(
            "--nnodes", "2", "--node-rank", str(n), "--master-port", port,
            "--insecure-store", "--node-timeout", "15", script,
        )
        for n in (0, 1)
    ]  # fmt: skip
    results = launch.finish_all(procs, timeout=60)
    for code, _out, err in results:
        assert code == 0, err
    assert "[0]: sum 2.0" in results[0][1] and "[1]: sum 2.0" in results[1][1]


def test_several_launchers_on_loopback_share_a_private_secret(launch):
    """Launchers meeting at 127.0.0.1 are all on this host: a private per-user file
    carries one secret to every node, so the store is authenticated with no flag."""
    script = launch.script(
        "tok.py",
        "import hashlib, os\nimport numpy as np\nimport distrib as dist\n"
        "tok = os.environ['DISTRIB_AUTH_TOKEN']\ndist.init_process_group()\n"
        "x = np.ones(3)\ndist.all_reduce(x)\n"
        "print('sum', x[0], 'token', hashlib.sha256(tok.encode()).hexdigest()[:12])\n"
        "dist.destroy_process_group()\n",
    )
    port = str(free_port())
    procs = [
        launch.popen(
            "--nnodes", "2", "--node-rank", str(n), "--master-port", port,
            "--node-timeout", "15", script,
        )
        for n in (0, 1)
    ]  # fmt: skip
    results = launch.finish_all(procs, timeout=60)
    for code, _out, err in results:
        assert code == 0, err
    tokens = {line.split("token ")[1] for _c, out, _e in results for line in out.splitlines()}
    assert len(tokens) == 1, tokens
    assert "[0]: sum 2.0" in results[0][1] and "[1]: sum 2.0" in results[1][1]


def test_loopback_store_without_a_token_uses_a_private_file(monkeypatch):
    monkeypatch.delenv("DISTRIB_AUTH_TOKEN", raising=False)
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=5)
    path = auth.token_path(master.port)
    st, dst = os.stat(path), os.stat(os.path.dirname(path))
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_IMODE(dst.st_mode) == 0o700
    assert st.st_uid == os.getuid()
    client = TCPStore("127.0.0.1", master.port, timeout=5)  # finds the secret by itself
    client.set("k", b"v")
    intruder = TCPStore("127.0.0.1", master.port, timeout=5, auth_token="guess")
    with pytest.raises(distrib.DistAuthError, match="refused"):
        intruder.get("k")
    # a client that cannot read the file (another user) has no secret: refused too
    monkeypatch.setattr(auth, "read_token_file", lambda port: None)
    stranger = TCPStore("127.0.0.1", master.port, timeout=5)
    with pytest.raises(distrib.DistAuthError, match="DISTRIB_AUTH_TOKEN"):
        stranger.get("k")
    assert master.get("k") == b"v"
    for s in (stranger, intruder, client, master):
        s.close()
    assert not os.path.exists(path)  # removed with its store


def test_client_with_a_secret_refuses_a_store_without_one(monkeypatch):
    from distrib.store._server import StoreServer

    server = StoreServer("127.0.0.1", 0, None)
    server.start()
    client = TCPStore("127.0.0.1", server.port, timeout=5, auth_token="mine")
    with pytest.raises(distrib.DistAuthError, match="does not authenticate"):
        client.set("k", b"v")
    client.close()
    server.close()


def test_unauthenticated_store_warns_once(monkeypatch):
    monkeypatch.setattr(auth, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auth.warn_unauthenticated("198.18.0.1", 29500)
        auth.warn_unauthenticated("198.18.0.1", 29500)
    assert len(caught) == 1 and "DISTRIB_AUTH_TOKEN" in str(caught[0].message)
    assert not auth.is_loopback("198.18.0.1") and auth.is_loopback("127.0.0.2")
    assert auth.is_loopback("::1") and auth.is_loopback("localhost")


@pytest.mark.parametrize(
    "blob",
    [b"\xc1\xc1garbage", b"", msgpack.packb([1, 2, 3]), msgpack.packb("text"), b"\x92\x01"],
)
def test_garbage_in_the_failure_key_is_a_dist_error_naming_it(blob):
    group = types.SimpleNamespace(global_rank=1)
    err = ProcessGroup._reported(group, blob)  # type: ignore[arg-type]
    assert isinstance(err, distrib.DistError)
    assert "'failed'" in str(err) and err.rank == 1


def test_odd_failure_record_fields_still_make_a_dist_error():
    group = types.SimpleNamespace(global_rank=2)
    blob = msgpack.packb({"cls": ["x"], "rank": {"a": 1}, "op": 5, "peer": [1], "msg": b"m"})
    err = ProcessGroup._reported(group, blob)  # type: ignore[arg-type]
    assert isinstance(err, distrib.DistError) and err.rank == 2
