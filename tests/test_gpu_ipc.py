"""cupy arrays through multiprocessing by CUDA IPC: views, offsets, ordering, lifetime, misuse.

Needs cupy and a CUDA device; skips (with the reason) otherwise.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
from _gpu import cupy_or_skip

cupy = cupy_or_skip()

from distrib._errors import DistUsageError  # noqa: E402
from distrib.gpu._driver import allocation_range, remove_driver_ipc_files  # noqa: E402
from distrib.gpu._ipc import ipc_collect, register_reducers  # noqa: E402

register_reducers(ForkingPickler)
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(90)]


@pytest.fixture(autouse=True, scope="module")
def _driver_ipc_file():
    """This (parent) process exports IPC events: the CUDA driver keeps a /dev/shm file for
    them until exit, after the suite's leak check. Every consumer is gone at module end."""
    yield
    remove_driver_ipc_files()


SPAWN = mp.get_context("spawn")


def _get(queue, timeout=20):
    """Next item from a child; a child's traceback fails the test at once."""
    item = queue.get(timeout=timeout)
    if isinstance(item, str) and item.startswith("Traceback"):
        pytest.fail("child process failed:\n" + item)
    return item


def _reports(outbox_arg):
    """Decorate a child: any exception is sent (as its traceback) to the given queue argument."""

    def wrap(fn):
        def child(*args):
            try:
                fn(*args)
            except BaseException:
                import traceback

                args[outbox_arg].put(traceback.format_exc())
                raise

        child.__name__ = child.__qualname__ = fn.__name__
        return child

    return wrap


_SPIN_FILL = r"""
extern "C" __global__ void spin_fill(float* x, long long n, long long cycles, float v) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) x[i] = v;
}
"""


def _register():
    from multiprocessing.reduction import ForkingPickler

    from distrib.gpu._ipc import register_reducers

    register_reducers(ForkingPickler)


@_reports(1)
def _child_views(inbox, outbox):
    _register()
    arrays = inbox.get(timeout=30)
    outbox.put([a.get() for a in arrays])  # host copies, for the parent to compare
    for a in arrays:
        if a.size:
            a[(0,) * a.ndim] = 42  # writes must be visible in the parent
    import cupy

    cupy.cuda.get_current_stream().synchronize()
    outbox.put("written")
    inbox.get(timeout=30)  # hold the arrays until the parent has checked


def test_views_and_pool_offsets_travel_and_write_back():
    big = cupy.empty(1 << 20, dtype=cupy.float32)
    del big  # its pool chunk is split for the next arrays: they sit at offsets in one cudaMalloc
    a = cupy.arange(1000, dtype=cupy.float32)
    b = cupy.arange(64 * 48, dtype=cupy.int64).reshape(64, 48)
    offsets = [a.data.ptr - allocation_range(a.data.ptr, what="t")[0]]
    offsets.append(b.data.ptr - allocation_range(b.data.ptr, what="t")[0])
    assert max(offsets) > 0, "test setup: expected a sub-allocated array"
    sent = [a, a[3:17], a[::3], b[1:, 2:9], b.T[5:, ::2], cupy.empty(0, dtype=cupy.float16)]
    expect = [x.get() for x in sent]
    inbox, outbox = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=_child_views, args=(inbox, outbox))
    proc.start()
    try:
        inbox.put(sent)
        got = _get(outbox)
        assert len(got) == len(expect)
        for e, g in zip(expect, got, strict=True):
            assert e.dtype == g.dtype and e.shape == g.shape
            np.testing.assert_array_equal(e, g)
        assert _get(outbox) == "written"
        assert float(a[0]) == 42 and float(a[3]) == 42  # a, a[3:17] (a[::3] starts at 0)
        assert int(b[1, 2]) == 42 and int(b[0, 5]) == 42  # b[1:, 2:9] and b.T[5:, ::2]
        inbox.put("bye")
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


@_reports(1)
def _child_read(inbox, outbox):
    import cupy

    cupy.zeros(1).sum()  # CUDA initialised before the parent starts its slow kernel
    outbox.put("ready")
    arr = inbox.get(timeout=30)
    outbox.put(arr.get())  # .get() syncs this process's stream, which waits on the sender's event


def test_consumer_waits_for_producer_event():
    x = cupy.zeros(1 << 16, dtype=cupy.float32)
    spin = cupy.RawKernel(_SPIN_FILL, "spin_fill")
    rate = cupy.cuda.Device().attributes["ClockRate"] * 1000  # kHz -> cycles per second
    inbox, outbox = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=_child_read, args=(inbox, outbox))
    proc.start()
    try:
        assert _get(outbox) == "ready"
        done = cupy.cuda.Event(disable_timing=True)
        spin((64,), (256,), (x, np.int64(x.size), np.int64(int(1.5 * rate)), np.float32(7.0)))
        done.record()
        inbox.put(x)
        assert not done.done, "test setup: the kernel finished before the send"
        got = _get(outbox)
        assert (got == 7.0).all(), "consumer read before the producer's kernel finished"
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


@_reports(1)
def _child_hold(inbox, outbox):
    arr = inbox.get(timeout=30)
    outbox.put(float(arr.sum()))
    inbox.get(timeout=30)  # parent checked that we still hold it
    del arr
    import cupy

    cupy.cuda.get_current_stream().synchronize()  # the release is stream-ordered
    outbox.put("released")
    inbox.get(timeout=30)


def test_lifetime_producer_keeps_memory_until_consumer_releases():
    pool = cupy.get_default_memory_pool()
    x = cupy.ones(1 << 20, dtype=cupy.float32)
    before = ipc_collect()  # earlier tests' children have exited and released theirs
    inbox, outbox = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=_child_hold, args=(inbox, outbox))
    proc.start()
    try:
        inbox.put(x)
        assert _get(outbox) == float(1 << 20)
        used = pool.used_bytes()
        del x  # the producer's own reference goes; the lease keeps the memory
        assert ipc_collect() == before + 1
        assert pool.used_bytes() == used, "memory released while a consumer holds it"
        inbox.put("drop it")
        assert _get(outbox) == "released"
        end = time.monotonic() + 10
        while ipc_collect() > before and time.monotonic() < end:
            time.sleep(0.01)
        assert ipc_collect() == before
        assert pool.used_bytes() <= used - (4 << 20)
        inbox.put("bye")
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


@_reports(2)
def _child_forward(inbox, to_grandchild, outbox):
    _register()
    arr = inbox.get(timeout=30)
    to_grandchild.put(arr[10:20])  # re-send an imported array: travels by the original handle
    outbox.put(arr[5:8])  # back to its owner: must map to the owner's own memory
    outbox.put(inbox.get(timeout=30))  # hold `arr` until told


@_reports(1)
def _child_write(inbox, outbox):
    arr = inbox.get(timeout=30)
    arr[...] = -1
    import cupy

    cupy.cuda.get_current_stream().synchronize()
    outbox.put("written")


def test_resend_and_round_trip_to_owner():
    x = cupy.arange(100, dtype=cupy.float64)
    q1, q2, back = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
    forward = SPAWN.Process(target=_child_forward, args=(q1, q2, back))
    writer = SPAWN.Process(target=_child_write, args=(q2, back))
    forward.start()
    writer.start()
    try:
        q1.put(x)
        results = [_get(back), _get(back)]
        texts = [r for r in results if isinstance(r, str)]
        assert texts == ["written"], results
        view = next(r for r in results if not isinstance(r, str))
        del results
        assert view.data.ptr == x.data.ptr + 5 * 8, "round trip did not alias the owner's array"
        np.testing.assert_array_equal(x[10:20].get(), -np.ones(10))
        np.testing.assert_array_equal(x[:10].get(), np.arange(10.0))
        del view
        q1.put("bye")
        assert _get(back) == "bye"
    finally:
        for p in (forward, writer):
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert forward.exitcode == 0 and writer.exitcode == 0


def _producer_exits_early(to_consumer, inbox):
    _register()
    import cupy

    to_consumer.put(cupy.ones(1000, dtype=cupy.float32))
    inbox.get(timeout=30)  # exit only once the consumer holds the array


@_reports(1)
def _consumer_outlives(inbox, outbox):
    arr = inbox.get(timeout=30)
    outbox.put(float(arr.sum()))
    outbox.put(inbox.get(timeout=30))  # hold `arr` until the producer is gone
    del arr


def test_producer_exiting_first_warns(capfd):
    to_consumer, to_producer, results = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
    producer = SPAWN.Process(target=_producer_exits_early, args=(to_consumer, to_producer))
    consumer = SPAWN.Process(target=_consumer_outlives, args=(to_consumer, results))
    producer.start()
    consumer.start()
    try:
        assert _get(results) == 1000.0
        to_producer.put("exit now")
        producer.join(timeout=30)
        to_consumer.put("bye")
        assert _get(results) == "bye"
    finally:
        for p in (producer, consumer):
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    assert "still held by other processes" in capfd.readouterr().err


def test_managed_memory_is_refused():
    mem = cupy.cuda.malloc_managed(4096)
    arr = cupy.ndarray((1024,), dtype=cupy.float32, memptr=mem)
    with pytest.raises(DistUsageError, match="managed"):
        ForkingPickler.dumps(arr)


def _child_unpickle(payload, outbox):
    try:
        pickle.loads(payload)
    except Exception as exc:
        outbox.put((type(exc).__name__, str(exc)))
    else:
        outbox.put(("no error", ""))


def test_receiver_without_the_device():
    x = cupy.ones(10, dtype=cupy.float32)
    payload = bytes(ForkingPickler.dumps(x))
    # A fresh interpreter that sees no GPU (it must not import this module, which skips).
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=payload, env=env, capture_output=True, timeout=60
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "DistBackendError" in err and "cannot see that GPU" in err, err
    del x
    ipc_collect()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork of a threaded process
def test_fork_after_cuda_init_is_a_clear_error():
    x = cupy.ones(10, dtype=cupy.float32)
    payload = bytes(ForkingPickler.dumps(x))
    fork = mp.get_context("fork")
    outbox = fork.Queue()
    proc = fork.Process(target=_child_unpickle, args=(payload, outbox))
    proc.start()
    try:
        name, msg = _get(outbox)
    finally:
        proc.join(timeout=30)
    assert name == DistUsageError.__name__
    assert "forked" in msg and "spawn" in msg
    del x
    ipc_collect()
