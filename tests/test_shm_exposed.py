"""All-reduce of buffers every rank exposed in shared memory (``_exposed``): peers read
them through read-only mappings of each other's files, with no copy through the segment.

Real forked ranks on one ``ShmEngine`` each (``test_shm_engine.run_ranks``); each
rank's buffers live in its own memfd, registered with ``exposed`` as
``distrib.torch`` registers a moved DDP bucket.
"""

from __future__ import annotations

import mmap
import os
import signal
import time
from typing import Any

import numpy as np
import pytest
from _ranks import failure_of
from test_shm_engine import _data, _fold, run_ranks

from distrib._reduce_op import ReduceOp
from distrib.transport.shm._exposed import exposed
from distrib.transport.shm._reduce import exposed_min_bytes


class _Exposed:
    """A buffer of ``nbytes`` at ``offset`` in a memfd of this process, exposed."""

    def __init__(self, nbytes: int, offset: int = 0) -> None:
        self.fd = os.memfd_create("distrib-test-exposed")
        os.ftruncate(self.fd, offset + nbytes)
        self.mm = mmap.mmap(self.fd, offset + nbytes)
        self.raw = np.frombuffer(self.mm, np.uint8)
        exposed.add(self.raw.ctypes.data, offset + nbytes, self.fd)
        self.offset = offset

    def array(self, values: np.ndarray) -> np.ndarray:
        a = self.raw[self.offset : self.offset + values.nbytes].view(values.dtype)
        a[:] = values
        return a

    def close(self) -> None:
        """Forget and close the file; the mapping goes with the last view of it."""
        exposed.remove(self.raw.ctypes.data)
        os.close(self.fd)
        del self.raw, self.mm


def _count(nbytes: int, dtype: Any) -> int:
    return nbytes // np.dtype(dtype).itemsize


# (count, dtype, op): sizes from the threshold up, odd counts, integer and float ops
def _cases() -> list[tuple[int, Any, ReduceOp]]:
    m = exposed_min_bytes()
    return [
        (_count(m, np.float32) + 3, np.float32, ReduceOp.SUM),
        (_count(3 * m, np.int64) + 1, np.int64, ReduceOp.SUM),
        (_count(m, np.float64) + 5, np.float64, ReduceOp.MAX),
        (_count(m, np.int32) + 7, np.int32, ReduceOp.MIN),
    ]


def _exposed_reductions(eng: Any, rank: int, n: int) -> Any:
    if not eng.expose_buffers():
        return "no-cma"
    dl = time.monotonic() + 30
    out: dict[Any, Any] = {}
    for i, (count, dtype, op) in enumerate(_cases()):
        values = _data(rank, count, dtype)
        buf = _Exposed(values.nbytes, offset=4096 * i)  # a buffer inside a larger file
        a = buf.array(values)
        eng.all_reduce(a, op, 0, dl, call=None)
        out[i] = a.copy()
        buf.close()
    # random floats: the fold runs in rank order, so every rank gets gloo-identical bits
    values = np.random.default_rng(rank).standard_normal(_count(exposed_min_bytes(), np.float32))
    buf = _Exposed(values.astype(np.float32).nbytes)
    a = buf.array(values.astype(np.float32))
    eng.all_reduce(a, ReduceOp.SUM, 0, dl, call=None)
    out["float"] = a.copy()
    buf.close()
    # a private buffer on one rank: every rank takes another path, same result
    count = _count(2 * exposed_min_bytes(), np.float32)
    values = _data(rank, count, np.float32)
    if rank == 0:
        a = values.copy()
    else:
        buf = _Exposed(values.nbytes)
        a = buf.array(values)
    eng.all_reduce(a, ReduceOp.SUM, 0, dl, call=None)
    out["mixed"] = a.copy()
    out["mapped"] = len(eng._pipe.peers)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_exposed_all_reduce_matches_numpy(tmp_path: Any, n: int) -> None:
    results = run_ranks(tmp_path, n, _exposed_reductions, part=None, timeout=90)
    if results[0][1] == "no-cma":
        pytest.skip("peers' memory may not be read here (ptrace scope): not used")
    for i, (count, dtype, op) in enumerate(_cases()):
        fn = {ReduceOp.SUM: np.add, ReduceOp.MAX: np.maximum, ReduceOp.MIN: np.minimum}[op]
        want = _fold(fn, [_data(q, count, dtype) for q in range(n)])
        for rank in range(n):
            np.testing.assert_array_equal(results[rank][1][i], want, err_msg=f"case {i}")
    inputs = [
        np.random.default_rng(q)
        .standard_normal(_count(exposed_min_bytes(), np.float32))
        .astype(np.float32)
        for q in range(n)
    ]
    want_float = _fold(np.add, inputs)  # x0 + x1 + ... in rank order, bit for bit
    want_mixed = _fold(
        np.add,
        [_data(q, _count(2 * exposed_min_bytes(), np.float32), np.float32) for q in range(n)],
    )
    for rank in range(n):
        res = results[rank][1]
        np.testing.assert_array_equal(res["float"], want_float)
        np.testing.assert_array_equal(res["mixed"], want_mixed)
        # the exposed path ran: every peer's file was mapped (one per buffer it exposed)
        assert res["mapped"] >= n - 1, res["mapped"]


def _reused_fd(eng: Any, rank: int, n: int) -> Any:
    """A rank frees its buffer and exposes a new file that gets the same fd number:
    the peers must read the new file, not their mapping of the old one."""
    if not eng.expose_buffers():
        return "no-cma"
    dl = time.monotonic() + 30
    count = _count(exposed_min_bytes(), np.float32)
    results, fds = [], []
    for round_ in range(3):
        buf = _Exposed(count * 4)
        fds.append(buf.fd)
        a = buf.array(np.full(count, float(rank + 10 * round_), np.float32))
        eng.all_reduce(a, ReduceOp.SUM, 0, dl, call=None)
        results.append(float(a[0]))
        buf.close()
    return results, fds, len(eng._pipe.peers)


@pytest.mark.timeout(60)
def test_a_new_file_on_a_reused_fd_is_mapped_afresh(tmp_path: Any) -> None:
    n = 2
    results = run_ranks(tmp_path, n, _reused_fd, part=None)
    if results[0][1] == "no-cma":
        pytest.skip("peers' memory may not be read here (ptrace scope): not used")
    for rank in range(n):
        sums, fds, mapped = results[rank][1]
        assert sums == [sum(q + 10 * r for q in range(n)) for r in range(3)], sums
        assert len(set(fds)) == 1, fds  # the kernel handed out the same number each time
        assert mapped == n - 1, mapped  # the stale mappings were dropped


def _die_after_handshake(eng: Any, rank: int, n: int) -> Any:
    """The last rank dies once every rank has published its buffer, before its part
    is final: the others must name it, not wait out the timeout."""
    if not eng.expose_buffers():
        return "no-cma"
    count = _count(2 * exposed_min_bytes(), np.float32)
    buf = _Exposed(count * 4)
    a = buf.array(np.ones(count, np.float32))
    if rank == n - 1:
        pipe = eng._pipe
        pipe.peer_view = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    return failure_of(lambda: eng.all_reduce(a, ReduceOp.SUM, 0, time.monotonic() + 20, call=None))


@pytest.mark.timeout(60)
def test_peer_dying_during_exposed_all_reduce_is_named(tmp_path: Any) -> None:
    n = 3
    results = run_ranks(tmp_path, n, _die_after_handshake, expect_errors=True, part=None)
    if results[0][1] == "no-cma":
        pytest.skip("peers' memory may not be read here (ptrace scope): not used")
    for rank in range(n - 1):
        status, value = results[rank]
        assert status == "ok" and value is not None, value
        name, peer, elapsed = value
        assert name == "DistPeerLostError" and peer == n - 1, value
        assert elapsed < 5, value


def _mismatched_exposed(eng: Any, rank: int, n: int) -> Any:
    from distrib.transport._calldesc import CallDesc, CallsDiffer

    if not eng.expose_buffers():
        return "no-cma"
    count = _count(exposed_min_bytes(), np.float32) + rank  # ranks disagree on the size
    buf = _Exposed(count * 4)
    a = buf.array(np.ones(count, np.float32))
    call = CallDesc("all_reduce", (count,), "<f4", "SUM")
    try:
        eng.all_reduce(a, ReduceOp.SUM, 0, time.monotonic() + 20, call=call)
    except CallsDiffer as differ:
        return [c.shape if c is not None else None for c in differ.calls], bool((a == 1).all())
    return None


@pytest.mark.timeout(60)
def test_mismatched_sizes_are_caught_before_any_write(tmp_path: Any) -> None:
    results = run_ranks(tmp_path, 2, _mismatched_exposed, part=None)
    if results[0][1] == "no-cma":
        pytest.skip("peers' memory may not be read here (ptrace scope): not used")
    base = _count(exposed_min_bytes(), np.float32)
    for rank in range(2):
        shapes, untouched = results[rank][1]
        assert shapes == [(base,), (base + 1,)], shapes
        assert untouched


@pytest.mark.timeout(30)
def test_forgetting_a_range_never_waits_for_the_registry_lock() -> None:
    """A storage's finalizer may run inside a garbage collection that an allocation
    under the registry's own lock started (same thread): it must not take the lock."""
    buf = _Exposed(4096)
    addr = buf.raw.ctypes.data
    assert exposed.find(buf.raw) is not None
    with exposed._lock:  # as if add() or find() were running on this thread
        exposed.remove(addr)
    assert exposed.find(buf.raw) is None
    assert len(exposed) == 0
    buf.close()


def _freed_and_fds(eng: Any, rank: int, n: int) -> Any:
    """Peers let go of a freed buffer's file at their next large all-reduce, and a
    mapping holds no file descriptor."""
    from distrib.transport.shm import _exposed

    if not eng.expose_buffers():
        return "no-cma"
    _exposed._SWEEP_S = 0.0  # sweep at every all-reduce
    dl = time.monotonic() + 30
    count = _count(exposed_min_bytes(), np.float32)
    fds_before = len(os.listdir("/proc/self/fd"))
    bufs = [_Exposed(count * 4) for _ in range(4)]
    for b in bufs:
        eng.all_reduce(b.array(np.ones(count, np.float32)), ReduceOp.SUM, 0, dl, call=None)
    mapped = len(eng._pipe.peers)
    # less this rank's own files: each memfd and the duplicate Python's mmap keeps of it
    fds_during = len(os.listdir("/proc/self/fd")) - 2 * len(bufs)
    for b in bufs:
        b.close()
    eng.barrier(0, dl, call=None)  # every rank has closed its files
    private = np.ones(count, np.float32)
    eng.all_reduce(private, ReduceOp.SUM, 0, dl, call=None)  # sweeps first
    return mapped, len(eng._pipe.peers), fds_before, fds_during, float(private[0])


@pytest.mark.timeout(60)
def test_freed_buffers_are_unmapped_and_mappings_hold_no_fds(tmp_path: Any) -> None:
    n = 3
    results = run_ranks(tmp_path, n, _freed_and_fds, part=None)
    if results[0][1] == "no-cma":
        pytest.skip("peers' memory may not be read here (ptrace scope): not used")
    for rank in range(n):
        mapped, after, fds_before, fds_during, total = results[rank][1]
        assert mapped == 4 * (n - 1), mapped
        assert after == 0, f"rank {rank} still maps {after} freed files"
        assert fds_during == fds_before, (fds_before, fds_during)
        assert total == n
