"""TCPStore / FileStore: torch's semantics, multi-process use, authentication, fuzzing."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import threading
import time

import pytest
from _ranks import rank_values
from _store_faults import RawClient

import distrib
from distrib.comm import FileStore, PrefixStore, TCPStore
from distrib.store import _wire as wire
from distrib.testing import run_local_ranks


@pytest.fixture
def master():
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=5)
    yield store
    store.close()


def _exercise(store) -> None:
    store.set("a", "x")
    store.set("b", b"\x00\xff")
    assert store.get("a") == b"x" and store.get("b") == b"\x00\xff"
    assert store.add("n", 2) == 2 and store.add("n", -5) == -3
    assert store.get("n") == b"-3"
    # compare_set: torch's rules (missing + empty expected sets; mismatch returns current).
    assert store.compare_set("c", "", "v1") == b"v1"
    assert store.compare_set("c", "nope", "v2") == b"v1"
    assert store.compare_set("c", "v1", "v2") == b"v2"
    assert store.compare_set("missing", "x", "y") == b"x"
    assert store.check(["a", "b"]) and not store.check(["a", "zz"])
    store.wait(["a", "c"], 1.0)
    assert store.num_keys() >= 4
    assert store.delete_key("a") is True and store.delete_key("a") is False
    assert not store.check(["a"])
    with pytest.raises(TypeError, match="key must be a string"):
        store.set(3, b"x")
    with pytest.raises(TypeError, match="must be str or bytes"):
        store.set("k", 3.5)
    with pytest.raises(TypeError, match="not one string"):
        store.wait("a")


@pytest.mark.timeout(30)
def test_tcpstore_semantics(master):
    assert master.port > 0
    _exercise(master)
    client = TCPStore("127.0.0.1", master.port, timeout=5)
    assert client.get("b") == b"\x00\xff"
    client.close()


@pytest.mark.timeout(30)
def test_filestore_semantics(tmp_path):
    _exercise(FileStore(str(tmp_path / "store"), timeout=5))


@pytest.mark.timeout(30)
def test_prefix_store_isolates(master):
    p1, p2 = PrefixStore("g1", master), PrefixStore("g2", master)
    p1.set("k", "one")
    p2.set("k", "two")
    assert (p1.get("k"), p2.get("k"), master.get("g1/k")) == (b"one", b"two", b"one")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["tcp", "file"])
def test_get_and_wait_time_out_with_clear_error(master, tmp_path, kind):
    store = master if kind == "tcp" else FileStore(str(tmp_path / "s"), timeout=5)
    store.set_timeout(0.3)
    start = time.monotonic()
    with pytest.raises(distrib.DistTimeoutError, match="never"):
        store.get("never")
    assert time.monotonic() - start < 3
    with pytest.raises(distrib.DistTimeoutError, match="never"):
        store.wait(["never"], 0.2)


@pytest.mark.timeout(30)
def test_blocking_get_released_by_other_thread(master):
    client = master.clone()
    got = []
    t = threading.Thread(target=lambda: got.append(client.get("late")))
    t.start()
    master.set("late", "here")
    t.join(5)
    client.close()
    assert got == [b"here"]


@pytest.mark.timeout(30)
def test_unreachable_master_times_out():
    from tests._util import free_port

    store = TCPStore("127.0.0.1", free_port(), timeout=0.3)
    with pytest.raises(distrib.DistTimeoutError, match="is the master running"):
        store.set("k", "v")
    store.close()


def _worker(rank, n, port, secret):
    store = TCPStore("127.0.0.1", port, world_size=n, timeout=60, auth_token=secret)
    if rank == 0:  # its constructor waits for all n to join; it only counts itself in
        store.add("counter", 1)
        store.set("rank0", "x")
        store.close()
        return None
    store.add("counter", rank + 1)
    store.set(f"rank{rank}", str(os.getpid()))
    store.wait([f"rank{r}" for r in range(n)])
    got = (rank, int(store.get("counter")))
    store.close()
    return got


@pytest.mark.timeout(90)
@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_multiprocess_rendezvous(secret):
    n = 4
    master = TCPStore(
        "127.0.0.1",
        0,
        world_size=n,
        is_master=True,
        timeout=60,
        wait_for_workers=False,
        auth_token=secret,
    )
    try:
        # The ranks meet in this store (the one under test), not in a process group.
        ranks = run_local_ranks(_worker, n, master.port, secret, init_group=False, timeout=60)
        results = rank_values(ranks)[1:]
        assert all(r.exitcode == 0 for r in ranks)
        # Everyone saw all four increments only after all ranks had set their key.
        assert sorted(results) == [(r, sum(range(1, n + 1))) for r in range(1, n)]
    finally:
        master.close()


@pytest.mark.timeout(30)
def test_auth_refuses_wrong_secret_and_keeps_serving():
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=3, auth_token="right")
    master.set("k", "v")
    for bad in (None, "wrong"):
        intruder = TCPStore("127.0.0.1", master.port, timeout=3, auth_token=bad)
        with pytest.raises(distrib.DistAuthError, match="refused"):
            intruder.get("k")
        with pytest.raises(distrib.DistAuthError):
            intruder.set("k", "evil")
        intruder.close()
    assert master.get("k") == b"v"
    good = TCPStore("127.0.0.1", master.port, timeout=3, auth_token="right")
    assert good.get("k") == b"v"
    good.close()
    master.close()


@pytest.mark.timeout(60)
def test_auth_refuses_replayed_request():
    secret = b"token"
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=3, auth_token=secret)
    a = RawClient(master.port)
    a.handshake(secret)
    captured = a.request_frame("set", ["k", b"v1"])
    a.send_raw(captured)
    assert a.read()[1] == wire.Status.OK
    # 70,000 further requests (more than any count-bounded nonce window), pipelined.
    n = 70_000
    a.send_raw(b"".join(a.request_frame("ping", []) for _ in range(n)))
    for _ in range(n):
        assert a.read()[1] == wire.Status.OK
    master.set("k", "v2")
    a.send_raw(captured)  # its sequence number is long spent on this connection
    reply = a.read()
    assert reply[1] == wire.Status.AUTH and "sequence number" in reply[2]
    assert a.read() is None  # and the connection is closed
    b = RawClient(master.port)
    b.handshake(secret)
    b.send_raw(captured)  # on another connection the session key differs
    reply = b.read()
    assert reply[1] == wire.Status.AUTH and "authentication tag" in reply[2]
    assert master.get("k") == b"v2"  # neither replay changed anything
    a.close()
    b.close()
    master.close()


@pytest.mark.timeout(30)
def test_client_pickles_and_survives_fork(master):
    master.set("k", "v")
    clone = pickle.loads(pickle.dumps(master))
    assert clone.get("k") == b"v" and clone.is_master is False
    clone.close()
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_get_in_child, args=(pickle.dumps(master),))
    p.start()
    p.join(20)
    assert p.exitcode == 0
    assert master.get("child") == b"ok"


def _get_in_child(blob):
    store = pickle.loads(blob)
    assert store.get("k") == b"v"
    store.set("child", "ok")
    store.close()


@pytest.mark.timeout(30)
def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="port=0 is only valid for the master"):
        TCPStore("127.0.0.1", 0)
    with pytest.raises(ValueError, match="port must be"):
        TCPStore("127.0.0.1", 70000)
    with pytest.raises(TypeError, match="timeout"):
        TCPStore("127.0.0.1", 0, is_master=True, timeout="soon")
    with pytest.raises(distrib.DistStoreError, match="cannot bind"):
        a = TCPStore("127.0.0.1", 0, is_master=True)
        try:
            TCPStore("127.0.0.1", a.port, is_master=True)
        finally:
            a.close()


@pytest.mark.timeout(30)
def test_auth_token_from_environment(monkeypatch):
    monkeypatch.setenv("DISTRIB_AUTH_TOKEN", "from-env")
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=3)
    client = TCPStore("127.0.0.1", master.port, timeout=3)  # same env: same secret
    client.set("k", "v")
    monkeypatch.delenv("DISTRIB_AUTH_TOKEN")
    outsider = TCPStore("127.0.0.1", master.port, timeout=3)
    with pytest.raises(distrib.DistAuthError, match="DISTRIB_AUTH_TOKEN"):
        outsider.get("k")
    assert client.get("k") == b"v"
    for s in (outsider, client, master):
        s.close()
