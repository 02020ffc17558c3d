"""How large shared-memory all-reduces write into the segment (distrib/transport/shm/_stores.py).

``StoreChooser`` picks ordinary or streaming stores from measured call costs;
the streaming copy and both staged paths that use it (the C step and the
single-copy path) must give exactly the bits ordinary stores give, whatever
each rank chose. Ranks are forked processes driving the engine directly (as
in test_shm_engine).
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np
import pytest
from test_shm_engine import run_ranks

from distrib._reduce_op import ReduceOp
from distrib.transport.shm import _reduce
from distrib.transport.shm._native import load
from distrib.transport.shm._stores import StoreChooser, StoreKind

CACHED, STREAMING = StoreKind.CACHED, StoreKind.STREAMING
native = pytest.mark.skipif(load() is None, reason="no C compiler: no streaming stores")


# -- the choice --------------------------------------------------------------------
def _picks(chooser: StoreChooser, calls: int) -> list[StoreKind]:
    return [chooser.pick() for _ in range(calls)]


def test_without_streaming_stores_every_call_is_cached() -> None:
    chooser = StoreChooser(streaming=False)
    chooser.record(CACHED, 1.0, 1)  # ignored: nothing to choose between
    assert _picks(chooser, 40) == [CACHED] * 40


def test_the_other_kind_is_tried_early_and_then_every_explore_every_calls() -> None:
    chooser = StoreChooser(streaming=True, explore_every=16)
    picks = _picks(chooser, 64)
    tried = [i + 1 for i, kind in enumerate(picks) if kind is STREAMING]
    assert tried == [2, 4, 8, 16, 32, 48, 64]
    default = StoreChooser(streaming=True)
    tried = [i + 1 for i, kind in enumerate(_picks(default, 256)) if kind is STREAMING]
    assert tried == [2, 4, 8, 16, 32, 64, 128, 192, 256]


def test_it_switches_to_the_cheaper_kind_and_back() -> None:
    chooser = StoreChooser(streaming=True, explore_every=4, weight=1.0)
    chooser.record(CACHED, 10e-3, 1 << 20)
    chooser.record(STREAMING, 5e-3, 1 << 20)  # half the cost: switch
    assert chooser.current is STREAMING
    assert chooser.pick() is STREAMING or chooser.calls % 4 == 0
    chooser.record(CACHED, 2e-3, 1 << 20)  # the machine changed: cached is cheaper now
    assert chooser.current is CACHED


def test_costs_are_per_byte_so_sizes_mix() -> None:
    chooser = StoreChooser(streaming=True, weight=1.0)
    chooser.record(CACHED, 4e-3, 32 << 20)
    chooser.record(STREAMING, 3e-3, 16 << 20)  # cheaper per call, dearer per byte
    assert chooser.current is CACHED


def test_near_equal_costs_do_not_flip_the_choice() -> None:
    chooser = StoreChooser(streaming=True, weight=1.0, margin=0.05)
    chooser.record(CACHED, 10.0e-3, 1 << 20)
    chooser.record(STREAMING, 9.8e-3, 1 << 20)  # 2% cheaper: within the margin
    assert chooser.current is CACHED


def test_one_disturbed_call_does_not_flip_the_choice() -> None:
    chooser = StoreChooser(streaming=True, weight=0.25)
    chooser.record(CACHED, 10e-3, 1 << 20)
    chooser.record(STREAMING, 12e-3, 1 << 20)
    chooser.record(CACHED, 400e-3, 1 << 20)  # something else ran: counted as 20 ms at most
    assert chooser.current is CACHED


def test_a_lasting_change_does_flip_it() -> None:
    chooser = StoreChooser(streaming=True, weight=0.25)
    chooser.record(CACHED, 4e-3, 1 << 20)
    chooser.record(STREAMING, 6e-3, 1 << 20)
    for _ in range(4):  # cached stores became slow (measured in every call)
        chooser.record(CACHED, 11e-3, 1 << 20)
    assert chooser.current is STREAMING
    chooser.record(CACHED, 4e-3, 1 << 20)  # ... and fast again: one tried call tells
    assert chooser.current is CACHED


def test_fixed_kinds_and_bad_arguments() -> None:
    assert _picks(StoreChooser(streaming=True, fixed=STREAMING), 20) == [STREAMING] * 20
    fixed = StoreChooser(streaming=True, fixed=CACHED)
    fixed.record(STREAMING, 0.0, 1)
    assert _picks(fixed, 20) == [CACHED] * 20
    with pytest.raises(ValueError, match="fixed=STREAMING needs streaming"):
        StoreChooser(streaming=False, fixed=STREAMING)
    with pytest.raises(ValueError, match="explore_every must be at least 2"):
        StoreChooser(streaming=True, explore_every=1)


# -- the streaming copy ---------------------------------------------------------------
@native
@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 63, 64, 65, 127, 1000, 4096 + 3, 1 << 20])
def test_stream_copy_is_memcpy_at_every_alignment(length: int) -> None:
    lib = load()
    assert lib is not None
    rng = np.random.default_rng(length)
    src_buf = rng.integers(0, 256, length + 64, dtype=np.uint8)
    for src_off in (0, 1, 8, 15):
        for dst_off in (0, 3, 16, 31):
            dst_buf = np.full(length + 64, 0xAB, dtype=np.uint8)
            src = src_buf[src_off : src_off + length]
            lib.stream_copy(
                ctypes.c_void_p(dst_buf.ctypes.data + dst_off),
                ctypes.c_void_p(src.ctypes.data),
                length,
            )
            assert dst_buf[dst_off : dst_off + length].tobytes() == src.tobytes()
            # nothing written outside the destination
            assert (dst_buf[:dst_off] == 0xAB).all() and (dst_buf[dst_off + length :] == 0xAB).all()


# -- the all-reduce, whichever stores each rank uses ----------------------------------------
# The C step (between the one-shot sizes and _NATIVE_MAX) and the single-copy path
# above it, odd lengths so parts and steps are uneven.
_C_STEP = 300_001  # float32, 1.2 MB
_SINGLE_COPY = (_reduce._NATIVE_MAX // 4) + 12_345  # float32, just above _NATIVE_MAX


def _inputs(rank: int, count: int) -> np.ndarray:
    return np.random.default_rng(70 + rank).standard_normal(count).astype(np.float32)


def _with_stores(kinds: dict[int, StoreKind]) -> Any:
    """A scenario: all-reduce both sizes with rank r using stores ``kinds[r]``."""

    def scenario(eng: Any, rank: int, n: int) -> Any:
        pipe = eng._pipe
        assert pipe.native is not None, "the C library was not agreed on"
        pipe.native_stores = StoreChooser(streaming=True, fixed=kinds[rank])
        pipe.pull_stores = StoreChooser(streaming=True, fixed=kinds[rank])
        calls = {"native": 0, "pull": 0}
        for name, fn_name in (("native", "_native_all_reduce"), ("pull", "_pull_all_reduce")):
            fn = getattr(_reduce, fn_name)

            def counted(*args: Any, _fn: Any = fn, _name: str = name) -> Any:
                calls[_name] += 1
                return _fn(*args)

            setattr(_reduce, fn_name, counted)
        out = []
        for count in (_C_STEP, _SINGLE_COPY):
            buf = _inputs(rank, count)
            eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 60, call=None)
            out.append(buf)
        return out, calls

    return scenario


def _expected(n: int) -> list[np.ndarray]:
    want = []
    for count in (_C_STEP, _SINGLE_COPY):
        acc = _inputs(0, count)
        for q in range(1, n):  # rank order: ((x0 + x1) + x2) ...
            acc = acc + _inputs(q, count)
        want.append(acc)
    return want


@native
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "kinds",
    [
        {0: STREAMING, 1: STREAMING},
        {0: STREAMING, 1: STREAMING, 2: STREAMING},
        {0: STREAMING, 1: CACHED, 2: STREAMING, 3: CACHED},  # ranks that chose differently
        {0: CACHED, 1: STREAMING},
    ],
    ids=["2-streaming", "3-streaming", "4-mixed", "2-mixed"],
)
def test_all_reduce_gives_the_same_bits_with_either_stores(tmp_path: Any, kinds: dict) -> None:
    n = len(kinds)
    results = run_ranks(tmp_path, n, _with_stores(kinds), part=None, timeout=90)
    want = _expected(n)
    for rank in range(n):
        bufs, calls = results[rank][1]
        assert calls == {"native": 1, "pull": 1}, calls  # each path was really taken
        for got, expect in zip(bufs, want, strict=True):
            assert got.tobytes() == expect.tobytes()


def _adaptive(eng: Any, rank: int, n: int) -> Any:
    """The default chooser over many calls: it tries both kinds and stays correct."""
    kinds = []
    pick = eng._pipe.pull_stores.pick

    def logged() -> StoreKind:
        kind = pick()
        kinds.append(kind)
        return kind

    eng._pipe.pull_stores.pick = logged
    ok = True
    for i in range(10):
        buf = _inputs(rank + i, _SINGLE_COPY)
        eng.all_reduce(buf, ReduceOp.SUM, 0, time.monotonic() + 60, call=None)
        want = _inputs(i, _SINGLE_COPY)
        for q in range(1, n):
            want = want + _inputs(q + i, _SINGLE_COPY)
        ok = ok and buf.tobytes() == want.tobytes()
    return ok, [k.value for k in kinds], {k.value: v for k, v in eng._pipe.pull_stores.cost.items()}


@native
@pytest.mark.timeout(120)
def test_the_default_choice_measures_both_kinds_and_stays_exact(tmp_path: Any) -> None:
    results = run_ranks(tmp_path, 2, _adaptive, part=None, timeout=90)
    for rank in range(2):
        ok, kinds, cost = results[rank][1]
        assert ok
        assert len(kinds) == 10
        assert kinds[0] == "cached" and kinds[1] == "streaming"  # call 2 tries the other kind
        assert cost["cached"] is not None and cost["streaming"] is not None
        assert cost["cached"] > 0 and cost["streaming"] > 0
