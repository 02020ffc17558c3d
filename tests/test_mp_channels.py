"""Arrays through distrib.multiprocessing channels under fork, spawn and forkserver."""

from __future__ import annotations

import multiprocessing as std_mp
import subprocess
import sys

import numpy as np
import pytest

import distrib.multiprocessing as mp
import distrib.shm as shm

pytestmark = pytest.mark.timeout(60)

METHODS = ["fork", "spawn", "forkserver"]
WAIT_S = 30


@pytest.fixture(params=METHODS)
def ctx(request):
    return mp.get_context(request.param)


def _echo_add_one(inbox, outbox):
    """Receive arrays, add one in place, report whether they were shared, echo back."""
    while True:
        item = inbox.get()
        if item is None:
            return
        item += 1
        outbox.put((shm.is_shared(item), item))


def _join(proc):
    proc.join(WAIT_S)
    assert proc.exitcode == 0, f"child exit code {proc.exitcode}"


def test_queue_passes_shared_arrays_without_copying(ctx):
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_echo_add_one, args=(inbox, outbox))
    proc.start()
    try:
        shared = shm.zeros((256, 256))
        private = np.zeros(200_000)
        tiny = np.zeros(3)
        inbox.put(shared)
        was_shared, back = outbox.get(timeout=WAIT_S)
        assert was_shared and (shared == 1).all()  # the child wrote into our memory
        assert back.__array_interface__["data"][0] == shared.__array_interface__["data"][0]
        inbox.put(private)
        was_shared, back = outbox.get(timeout=WAIT_S)
        assert was_shared and (back == 1).all() and (private == 0).all()
        inbox.put(tiny)
        was_shared, back = outbox.get(timeout=WAIT_S)
        assert not was_shared and back.tolist() == [1, 1, 1]
        inbox.put(None)
    finally:
        _join(proc)


def _fill_arg(arr, view, value):
    arr[:] = value
    view[0] = -value


def test_process_args_are_shared(ctx):
    arr = shm.zeros(1000, dtype=np.int32)
    proc = ctx.Process(target=_fill_arg, args=(arr,), kwargs={"view": arr[::-100], "value": 7})
    proc.start()
    _join(proc)
    assert arr[0] == 7 and arr[-1] == -7 and (arr[1:-1] == 7).all()


def _simple_worker(inbox, outbox):
    arr = inbox.get()
    arr *= 2
    outbox.put(arr.sum())


def test_simple_queue(ctx):
    inbox, outbox = ctx.SimpleQueue(), ctx.SimpleQueue()
    proc = ctx.Process(target=_simple_worker, args=(inbox, outbox))
    proc.start()
    arr = shm.full(5000, 1.5)
    inbox.put(arr)
    assert outbox.get() == 15000.0
    _join(proc)
    assert (arr == 3.0).all()


def _joinable_worker(q):
    for _ in range(3):
        arr = q.get()
        arr[:] = arr.sum()
        q.task_done()


def test_joinable_queue(ctx):
    q = ctx.JoinableQueue()
    proc = ctx.Process(target=_joinable_worker, args=(q,))
    proc.start()
    arrays = [shm.full(10, float(i)) for i in range(3)]
    for a in arrays:
        q.put(a)
    q.join()
    assert [a[0] for a in arrays] == [0.0, 10.0, 20.0]
    _join(proc)


def _pipe_worker(conn):
    arr = conn.recv()
    arr[-1] = 123
    conn.send(shm.full(50_000, 4, dtype=np.int16))
    conn.close()


def test_pipe_both_directions(ctx):
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_pipe_worker, args=(there,))
    proc.start()
    arr = shm.zeros(10, dtype=np.int64)
    here.send(arr)
    got = here.recv()
    assert shm.is_shared(got) and got.dtype == np.int16 and (got == 4).all()
    _join(proc)
    assert arr[-1] == 123


def _scale(args):
    arr, k = args
    arr *= k
    return arr


def test_pool_arguments_and_results(ctx):
    arrays = [shm.full(20_000, float(i + 1)) for i in range(4)]
    with ctx.Pool(2) as pool:
        results = pool.map(_scale, [(a, 10) for a in arrays])
    for i, (a, r) in enumerate(zip(arrays, results, strict=True)):
        assert (a == 10.0 * (i + 1)).all()  # workers wrote into our arrays
        assert (
            shm.is_shared(r)
            and r.__array_interface__["data"][0] == a.__array_interface__["data"][0]
        )


def _get_len(q, out):
    out.put(len(q.get()))


def test_object_arrays_pass_as_ordinary_pickles(ctx):
    q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_get_len, args=(q, out))
    proc.start()
    q.put(np.array([None, "x", {1: 2}] * 1000, dtype=object))
    assert out.get(timeout=WAIT_S) == 3000
    _join(proc)


def test_stdlib_queue_still_copies():
    q = std_mp.get_context("fork").Queue()
    a = shm.zeros(100)
    q.put(a)
    got = q.get(timeout=WAIT_S)
    assert not shm.is_shared(got)
    q.close()
    q.join_thread()


def test_api_covers_the_standard_module():
    missing = set(std_mp.__all__) - set(mp.__all__)
    assert not missing, f"missing stdlib names: {sorted(missing)}"
    assert set(mp.get_all_start_methods()) >= {"fork", "spawn", "forkserver"}
    for method in METHODS:
        c = mp.get_context(method)
        assert c.get_start_method() == method
        assert isinstance(c.Queue(), mp.Queue().__class__)
    assert mp.get_sharing_strategy() in mp.get_all_sharing_strategies()
    assert mp.get_all_sharing_strategies() == {"file_descriptor", "file_system"}


_EXIT_SCRIPT = """
import sys
import numpy as np
import distrib.multiprocessing as mp

def child(q, out):
    a = q.get()
    a += 1
    out.put(a)

if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    q, out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=child, args=(q, out))
    p.start()
    q.put(np.zeros(1_000_000))
    print(out.get(timeout=30).sum())
    p.join(30)
    print("exit code", p.exitcode)
"""


@pytest.mark.parametrize("method", METHODS)
def test_exit_leaves_no_resource_warnings(method, tmp_path):
    """Parent and child close their daemon connections at exit (``python -X dev`` is quiet)."""
    script = tmp_path / "exit_script.py"
    script.write_text(_EXIT_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-X", "dev", str(script), method],
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1000000.0", "exit", "code", "0"], proc.stdout
    assert "ResourceWarning" not in proc.stderr, proc.stderr
