"""Collectives against numpy, written once, run at world sizes 1, 2, 3, 4 and 7.

Each world size is one launch that runs every case inside it (process start-up
would otherwise dominate). Data are small integers (floats too, products use
powers of two), so every dtype, float16 and complex included, has an exact
answer: results are compared bit for bit. Each rank can compute every other
rank's input from (case, rank), so it checks its own result locally and
reports a list of failures. The suite runs under DISTRIB_TRANSPORT=zmq and
=auto (the shared-memory engine, where one is available).
"""

from __future__ import annotations

import numpy as np
import pytest

import distrib as dist
from distrib.testing import run_local_ranks

DTYPES = ["int8", "int32", "int64", "float16", "float32", "float64", "complex64"]
BIG = 1000003  # the spec's large size (odd: splits unevenly across ranks)


def _data(case: int, rank: int, count: int, dtype: str, op: str = "sum") -> np.ndarray:
    rng = np.random.default_rng([case, rank])
    dt = np.dtype(dtype)
    if op == "product":
        vals = (
            rng.choice(np.array([1, 2, -1, 1], np.int64), count)
            if dt.kind in "iu"
            else rng.choice(np.array([0.5, 1.0, 2.0, -1.0]), count)
        )
    else:
        vals = rng.integers(-8, 9, count)
    out = vals.astype(dt)
    if dt.kind == "c":
        out = out + 1j * rng.integers(-4, 5, count).astype(dt)
    return out


def _reference(op: str, arrays: list[np.ndarray], n: int) -> np.ndarray:
    fn = {
        "sum": np.add,
        "avg": np.add,
        "product": np.multiply,
        "min": np.minimum,
        "max": np.maximum,
        "band": np.bitwise_and,
        "bor": np.bitwise_or,
        "bxor": np.bitwise_xor,
    }[op]
    acc = arrays[0].copy()
    for a in arrays[1:]:
        fn(acc, a, out=acc)
    if op == "avg":
        if acc.dtype.kind in "fc":
            acc /= n
        else:
            np.floor_divide(acc, n, out=acc)
    return acc


def _ops_for(dtype: str) -> list[str]:
    kind = np.dtype(dtype).kind
    ops = ["sum", "avg", "product"]
    if kind != "c":
        ops += ["min", "max"]
    if kind in "iu":
        ops += ["band", "bor", "bxor"]
    return ops


class _Checker:
    def __init__(self, rank: int, n: int) -> None:
        self.rank, self.n, self.case, self.failures = rank, n, 0, []

    def next(self) -> int:
        self.case += 1
        return self.case

    def same(self, what: str, got: np.ndarray, want: np.ndarray) -> None:
        if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
            self.failures.append(
                f"rank {self.rank}/{self.n}: {what}: got {got!r:.200} want {want!r:.200}"
            )


def _reductions(c: _Checker) -> None:
    n, r = c.n, c.rank
    small = [0, 1, 7, 13]  # 13 divides by none of 2, 3, 4, 7
    for dtype in DTYPES:
        for op in _ops_for(dtype):
            rop = dist.ReduceOp[op.upper()]
            for count in small:
                case = c.next()
                ins = [_data(case, q, count, dtype, op) for q in range(n)]
                want = _reference(op, ins, n)
                a = ins[r].copy()
                dist.all_reduce(a, op=rop)
                c.same(f"all_reduce {dtype} {op} {count}", a, want)
            count, case = 13, c.next()
            ins = [_data(case, q, count * n, dtype, op) for q in range(n)]
            full = _reference(op, ins, n)
            out = np.empty(count, dtype)
            dist.reduce_scatter_tensor(out, ins[r].copy(), op=rop)
            c.same(f"reduce_scatter_tensor {dtype} {op}", out, full[r * count : (r + 1) * count])
    # Large, uneven, through the ring (pipelined segments) for a few dtype/op pairs.
    for dtype, op in (
        ("float32", "sum"),
        ("int64", "bxor"),
        ("float16", "max"),
        ("complex64", "sum"),
        ("int8", "product"),
    ):
        case = c.next()
        ins = [_data(case, q, BIG, dtype, op) for q in range(n)]
        a = ins[r].copy()
        dist.all_reduce(a, op=dist.ReduceOp[op.upper()])
        c.same(f"all_reduce big {dtype} {op}", a, _reference(op, ins, n))
    # Every root for reduce; small (tree) and large (chain) paths.
    for count in (0, 7, 13, BIG):
        for root in range(n) if count < BIG else sorted({0, n - 1}):
            case = c.next()
            ins = [_data(case, q, count, "int32") for q in range(n)]
            a = ins[r].copy()
            dist.reduce(a, dst=root, op=dist.ReduceOp.SUM)
            c.same(
                f"reduce root {root} {count}", a, _reference("sum", ins, n) if r == root else ins[r]
            )
    case = c.next()
    block = BIG // n + 1
    ins = [_data(case, q, block * n, "float32") for q in range(n)]
    out = np.empty(block, np.float32)
    dist.reduce_scatter(out, [x.copy() for x in np.split(ins[r], n)], op=dist.ReduceOp.SUM)
    c.same("reduce_scatter big", out, np.split(_reference("sum", ins, n), n)[r])


def _movement(c: _Checker) -> None:
    n, r = c.n, c.rank
    for dtype in DTYPES:
        for count in (0, 1, 7, 13):
            # Every root for two dtypes; one (rotating) root for the others.
            roots = range(n) if dtype in ("int32", "float16") else [(count + len(dtype)) % n]
            for root in roots:
                case = c.next()
                ins = [_data(case, q, count, dtype) for q in range(n)]
                a = ins[r].copy()
                dist.broadcast(a, src=root)
                c.same(f"broadcast {dtype} {count} root {root}", a, ins[root])
                gl = [np.empty(count, dtype) for _ in range(n)] if r == root else None
                dist.gather(ins[r], gl, dst=root)
                if r == root:
                    for q in range(n):
                        c.same(f"gather {dtype} {count} root {root} from {q}", gl[q], ins[q])
                case = c.next()
                blocks = [_data(case, q, count, dtype) for q in range(n)]
                out = np.empty(count, dtype)
                dist.scatter(out, blocks if r == root else None, src=root)
                c.same(f"scatter {dtype} {count} root {root}", out, blocks[r])
            case = c.next()
            ins = [_data(case, q, count, dtype) for q in range(n)]
            lst = [np.empty(count, dtype) for _ in range(n)]
            dist.all_gather(lst, ins[r])
            for q in range(n):
                c.same(f"all_gather {dtype} {count} from {q}", lst[q], ins[q])
            outs = np.empty(count * n, dtype)
            dist.all_gather_into_tensor(outs, ins[r])
            c.same(f"all_gather_into_tensor {dtype} {count}", outs, np.concatenate(ins))
            case = c.next()
            sent = [[_data(case * 100 + q, j, count, dtype) for j in range(n)] for q in range(n)]
            got = [np.empty(count, dtype) for _ in range(n)]
            dist.all_to_all(got, [x.copy() for x in sent[r]])
            for q in range(n):
                c.same(f"all_to_all {dtype} {count} from {q}", got[q], sent[q][r])
    for root in sorted({0, n - 1}):  # large: pipelined chain broadcast
        case = c.next()
        ins = [_data(case, q, BIG, "float64") for q in range(n)]
        a = ins[r].copy()
        dist.broadcast(a, src=root)
        c.same(f"broadcast big root {root}", a, ins[root])
    case = c.next()
    ins = [_data(case, q, BIG, "int16") for q in range(n)]
    outs = np.empty(BIG * n, np.int16)
    dist.all_gather_into_tensor(outs, ins[r])
    c.same("all_gather_into_tensor big", outs, np.concatenate(ins))
    single_in = np.arange(n * 5, dtype=np.int64).reshape(n, 5) + 100 * r
    single_out = np.empty_like(single_in)
    dist.all_to_all_single(single_out, single_in)
    c.same(
        "all_to_all_single",
        single_out,
        np.stack([np.arange(r * 5, r * 5 + 5) + 100 * q for q in range(n)]),
    )


def _layouts_and_p2p(c: _Checker) -> None:
    n, r = c.n, c.rank
    # Non-contiguous and multi-dimensional arrays work in place.
    base = np.arange(40, dtype=np.float64).reshape(5, 8) * (r + 1)
    view = base[:, ::2]  # strided
    dist.all_reduce(view)
    want = np.arange(40, dtype=np.float64).reshape(5, 8)[:, ::2] * sum(range(1, n + 1))
    c.same("all_reduce strided view", view, want)
    c.same("untouched columns", base[:, 1::2], np.arange(40.0).reshape(5, 8)[:, 1::2] * (r + 1))
    t = (np.arange(12, dtype=np.int32).reshape(3, 4) + r).T
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    c.same("all_reduce transposed", t, (np.arange(12, dtype=np.int32).reshape(3, 4) + n - 1).T)
    dist.barrier()
    if n > 1:
        # Ring of sends with two tags, received in the opposite tag order.
        nxt, prv = (r + 1) % n, (r - 1) % n
        w1 = dist.isend(np.full(3, r, np.int64), dst=nxt, tag=1)
        w2 = dist.isend(np.full(BIG, r, np.float32), dst=nxt, tag=2)
        big = np.empty(BIG, np.float32)
        small = np.empty(3, np.int64)
        dist.recv(big, src=prv, tag=2)
        w3 = dist.irecv(small, src=prv, tag=1)
        for w in (w1, w2, w3):
            w.wait(timeout=30)
        c.same("p2p tag 2", big, np.full(BIG, prv, np.float32))
        c.same("p2p tag 1", small, np.full(3, prv, np.int64))
    # Object collectives (msgpack + arrays, never pickle).
    objs = [None, None]
    if r == 0:
        objs = [{"lr": 0.1, "steps": (1, 2)}, np.arange(3, dtype=np.int16)]
    dist.broadcast_object_list(objs, src=0)
    if objs[0] != {"lr": 0.1, "steps": (1, 2)} or not np.array_equal(objs[1], np.arange(3)):
        c.failures.append(f"broadcast_object_list got {objs!r}")
    gathered = [None] * n
    dist.all_gather_object(gathered, {"rank": r, "pad": "x" * r, "c": 1 + 2j})
    if gathered != [{"rank": q, "pad": "x" * q, "c": 1 + 2j} for q in range(n)]:
        c.failures.append(f"all_gather_object got {gathered!r}")
    for root in range(n):
        glist = [None] * n if r == root else None
        dist.gather_object({r}, glist, dst=root)
        if r == root and glist != [{q} for q in range(n)]:
            c.failures.append(f"gather_object root {root} got {glist!r}")
        got = [None]
        dist.scatter_object_list(
            got, [f"to{q}" * q for q in range(n)] if r == root else None, src=root
        )
        if got != [f"to{r}" * r]:
            c.failures.append(f"scatter_object_list root {root} got {got!r}")
    try:
        dist.all_gather_object([None] * n, object())
        c.failures.append("object() was sent")
    except TypeError as exc:
        if "builtins.object" not in str(exc):
            c.failures.append(f"unhelpful TypeError: {exc}")


def _suite(rank: int, n: int) -> list[str]:
    c = _Checker(rank, n)
    _reductions(c)
    _movement(c)
    _layouts_and_p2p(c)
    return [*c.failures, f"cases={c.case}"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", ["zmq", "auto"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_collectives_match_numpy(world_size, transport):
    results = run_local_ranks(
        _suite, world_size, timeout=200, group_timeout=60, env={"DISTRIB_TRANSPORT": transport}
    )
    bad = [r.describe() for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    failures = [f for r in results for f in r.value if not f.startswith("cases=")]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:30])
    assert len({r.value[-1] for r in results}) == 1  # every rank ran every case
