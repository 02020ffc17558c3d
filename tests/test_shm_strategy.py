"""The two sharing strategies: anonymous memfds and named segments in /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import distrib.multiprocessing as mp
import distrib.shm as shm

pytestmark = pytest.mark.timeout(60)
WAIT_S = 30


def _ours_in(directory: str) -> set[str]:
    prefix = f"distrib_{os.getpid()}_"
    return {n for n in os.listdir(directory) if n.startswith(prefix)}


@pytest.fixture
def strategy():
    before = shm.get_sharing_strategy()
    yield shm.set_sharing_strategy
    shm.set_sharing_strategy(before)


def test_file_descriptor_strategy_never_names_anything_in_dev_shm(strategy, monkeypatch):
    monkeypatch.delenv("DISTRIB_SHM_DIR", raising=False)  # the default location
    strategy("file_descriptor")
    arrays = [shm.zeros(1 << 20), shm.zeros(10)]
    assert not _ours_in("/dev/shm")
    assert all(shm.is_shared(a) for a in arrays)


def _double_and_report(q, out):
    arr = q.get()
    arr *= 2
    out.put(float(arr.sum()))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_file_system_strategy_uses_dev_shm_and_cleans_up(strategy, method, monkeypatch):
    # The default location (the suite points DISTRIB_SHM_DIR elsewhere); only the names
    # this process made are looked at: other programs use /dev/shm too.
    monkeypatch.delenv("DISTRIB_SHM_DIR", raising=False)
    strategy("file_system")
    ctx = mp.get_context(method)
    q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_double_and_report, args=(q, out))
    proc.start()
    big = shm.full(300_000, 1.0)
    small = shm.full(3, 1.0)
    big_path = shm._array.block_of(big).segment.path
    slab_path = shm._array.block_of(small).segment.path
    assert os.path.dirname(big_path) == os.path.dirname(slab_path) == "/dev/shm"
    assert {os.path.basename(big_path), os.path.basename(slab_path)} <= _ours_in("/dev/shm")
    q.put(big)
    assert out.get(timeout=WAIT_S) == 600_000.0
    proc.join(WAIT_S)
    assert proc.exitcode == 0 and (big == 2.0).all() and small[0] == 1.0
    # The big array's segment goes once both processes dropped it. (The small
    # array's slab stays with this process's allocator until it exits.)
    del big, small
    deadline = time.monotonic() + 15
    while os.path.exists(big_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(big_path), "a named segment outlived its users"


def test_strategy_default_comes_from_the_environment():
    code = "import distrib.shm as s; print(s.get_sharing_strategy())"
    env = dict(os.environ, DISTRIB_SHARING_STRATEGY="file_system")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "file_system", out.stderr
    env["DISTRIB_SHARING_STRATEGY"] = "smoke_signals"
    bad = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "DISTRIB_SHARING_STRATEGY" in bad.stderr


def _receive_with_strategy(kind, q, out):
    shm.set_sharing_strategy(kind)
    a, b = q.get(), q.get()
    a += 1
    b += 1
    out.put(shm.share(np.arange(100_000.0)))  # the reply uses the child's strategy


def test_a_receiver_attaches_either_kind(strategy):
    ctx = mp.get_context("fork")
    q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receive_with_strategy, args=("file_system", q, out))
    proc.start()
    strategy("file_descriptor")
    a = shm.zeros(50_000)
    strategy("file_system")
    b = shm.zeros(50_000)
    q.put(a)
    q.put(b)
    reply = out.get(timeout=WAIT_S)
    proc.join(WAIT_S)
    assert (a == 1).all() and (b == 1).all()
    assert reply[-1] == 99_999.0 and shm.is_shared(reply)
