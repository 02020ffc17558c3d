"""The store's limits: each one refuses with an error naming it, and the store goes on."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import socket
import time

import psutil
import pytest
from _store_faults import RawClient

import distrib
from distrib.comm import TCPStore
from distrib.store import _wire as wire

pytestmark = pytest.mark.timeout(60)


def _master(**limits):
    return TCPStore(
        "127.0.0.1", 0, is_master=True, timeout=5, auth_token="s", limits=wire.Limits(**limits)
    )


def test_too_large_set_is_refused_before_it_is_sent():
    master = _master(max_value_bytes=1024)
    client = TCPStore("127.0.0.1", master.port, timeout=5, auth_token="s")
    client.set("small", b"x" * 1024)
    before = master.server._map.total_bytes
    for call in (
        lambda: client.set("big", b"x" * 1025),
        lambda: client.compare_set("big", b"", b"x" * 1025),
    ):
        with pytest.raises(
            distrib.DistStoreError, match=r"1025 bytes.*limit of 1024.*max_value_bytes"
        ):
            call()
    assert master.server._map.total_bytes == before  # nothing reached the server
    assert client.get("small") == b"x" * 1024
    client.close()
    master.close()


def test_default_limit_refuses_65_mib_at_once():
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=30)
    t0 = time.monotonic()
    with pytest.raises(distrib.DistStoreError, match="max_value_bytes"):
        master.set("huge", b"\0" * (65 << 20))
    assert time.monotonic() - t0 < 5  # a clear error, not a 30 s wait for a dropped message
    master.set("after", b"ok")
    assert master.get("after") == b"ok"
    master.close()


def test_total_bytes_and_key_count_limits():
    master = _master(max_total_bytes=10_000, max_keys=5)
    for i in range(5):
        master.set(f"k{i}", b"x" * 100)
    with pytest.raises(distrib.DistStoreError, match=r"max_keys"):
        master.set("k5", b"x")
    master.set("k0", b"y" * 200)  # overwriting an existing key is not a new key
    with pytest.raises(distrib.DistStoreError, match=r"max_total_bytes"):
        master.set("k1", b"x" * 9_900)
    assert master.delete_key("k4")
    master.set("k5", b"x")
    assert master.num_keys() == 5
    master.close()


def test_connection_limit_names_it_and_frees_up():
    master = _master(max_connections=3)  # the master's own client is one of them
    master.set("k", b"v")
    others = [TCPStore("127.0.0.1", master.port, timeout=5, auth_token="s") for _ in range(3)]
    assert others[0].get("k") == b"v" and others[1].get("k") == b"v"
    with pytest.raises(distrib.DistStoreError, match=r"limit of 3 connections \(max_connections\)"):
        others[2].get("k")
    others[0].close()
    time.sleep(0.2)
    assert others[2].get("k") == b"v"
    for o in others:
        o.close()
    master.close()


def test_parked_wait_limits_name_them_and_are_released():
    master = _master(max_parked=5, max_parked_per_connection=3)
    a = RawClient(master.port)
    a.handshake(b"s")
    a.send_raw(b"".join(a.request_frame("get", [f"never{i}", 30.0]) for i in range(4)))
    reply = a.read()
    assert reply[0] == 4 and reply[1] == wire.Status.LIMIT
    assert "max_parked_per_connection" in reply[2]
    b = RawClient(master.port)
    b.handshake(b"s")
    b.send_raw(b"".join(b.request_frame("wait", [["never"], 30.0]) for _ in range(3)))
    reply = b.read()
    assert reply[0] == 3 and "max_parked" in reply[2]
    assert master.server._map.parked == 5
    master.set("never0", b"here")  # wakes exactly its own waiter
    assert a.read() == [1, wire.Status.OK, b"here"]
    a.close()
    b.close()
    end = time.monotonic() + 5
    while master.server._map.parked and time.monotonic() < end:
        time.sleep(0.02)
    assert master.server._map.parked == 0  # closed connections take their waits with them
    master.close()


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 1e306, 1e999, -1.0, 0, "1e999"])
def test_client_refuses_bad_timeouts(bad):
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=5)
    with pytest.raises((ValueError, TypeError), match="timeout"):
        master.wait(["k"], bad)
    with pytest.raises((ValueError, TypeError), match="timeout"):
        master.set_timeout(bad)
    with pytest.raises((ValueError, TypeError), match="timeout"):
        TCPStore("127.0.0.1", master.port, timeout=bad)
    master.set("still", b"up")
    assert master.get("still") == b"up"
    master.close()


def test_bad_timeout_on_the_wire_gets_an_error_and_the_thread_lives():
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=5)
    c = RawClient(master.port)
    c.handshake(b"")  # loopback store: read the secret as a client would
    c.close()
    from distrib.store._auth import read_token_file

    secret = read_token_file(master.port)
    c = RawClient(master.port)
    c.handshake(secret)
    for bad in (math.inf, math.nan, "1e999", 1e306, -5):
        c.send_raw(c.request_frame("get", ["missing", bad]))
        reply = c.read()
        assert reply[1] == wire.Status.ERROR and "timeout" in reply[2], reply
    assert master.server.alive()
    master.set("k", b"v")
    assert master.get("k") == b"v"
    c.close()
    master.close()


def _serve_with_few_descriptors(limit: int, out) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=5, auth_token="s")
    out.put(store.port)
    time.sleep(30)
    store.close()


def test_no_busy_loop_at_the_descriptor_limit():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_serve_with_few_descriptors, args=(64, out), daemon=True)
    proc.start()
    socks = []
    try:
        port = out.get(timeout=30)
        for _ in range(120):  # well past the server's 64 descriptors
            s = socket.socket()
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            socks.append(s)
        time.sleep(0.5)
        p = psutil.Process(proc.pid)
        cpu0 = sum(p.cpu_times()[:2])
        time.sleep(2.0)
        cpu = sum(p.cpu_times()[:2]) - cpu0
        print("cpu at the descriptor limit", cpu)
        assert cpu < 0.25, f"the store used {cpu:.2f} s of CPU in 2 s at its descriptor limit"
        for s in socks:
            s.close()
        socks.clear()
        time.sleep(0.5)
        client = TCPStore("127.0.0.1", port, timeout=10, auth_token="s")
        client.set("k", b"v")
        assert client.get("k") == b"v"  # serving again once descriptors are free
        client.close()
    finally:
        for s in socks:
            s.close()
        proc.kill()
        proc.join(10)
        assert not proc.is_alive()


def test_fds_of_test_process_unaffected():
    # the descriptor test above limits only its own child process
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 64
    assert os.getpid() > 0


def test_pipelined_requests_and_a_partial_frame_are_answered():
    master = _master()
    c = RawClient(master.port)
    c.handshake(b"s")
    frames = [c.request_frame("set", [f"p{i}", b"v"]) for i in range(3)]
    c.send_raw(frames[0] + frames[1] + frames[2][:7])  # two whole requests, part of a third
    c.sock.settimeout(5)
    assert [c.read()[:2] for _ in range(2)] == [[1, wire.Status.OK], [2, wire.Status.OK]]
    c.send_raw(frames[2][7:])
    assert c.read()[:2] == [3, wire.Status.OK]
    c.close()
    master.close()


def test_a_client_that_does_not_read_its_replies_is_held_back():
    master = _master()
    master.set("big", b"x" * (1 << 20))
    c = RawClient(master.port)
    c.handshake(b"s")
    n = 100  # 100 MiB of replies the client does not read for now
    c.send_raw(b"".join(c.request_frame("get", ["big", 5.0]) for _ in range(n)))
    time.sleep(1.0)
    held = max(len(conn.outbuf) for conn in master.server._conns.values())
    assert held < 24 << 20, f"{held} bytes of replies queued for a client that does not read"
    other = TCPStore("127.0.0.1", master.port, timeout=5, auth_token="s")
    other.set("k", b"v")
    assert other.get("k") == b"v"  # everyone else is served meanwhile
    c.sock.settimeout(10)
    assert all(c.read()[1] == wire.Status.OK for _ in range(n))  # then all are answered
    other.close()
    c.close()
    master.close()
