"""``distrib-bench``: nccl-tests-style tables for distrib's collectives, with peers side by side.

    distrib-bench --nproc 2 --ops all_reduce --sizes 4K,1M,16M,256M --compare

first prints a machine header (CPU model, logical cores, last-level cache,
physical memory, the memory copy rate of one process and of ``nproc``
processes at once, the buffer mode), then per collective one row per size:
size, count, dtype, op, the buffer sets each rank rotates through, time (us),
algbw and busbw (GB/s, busbw = algbw x nccl-tests' factor, 2(n-1)/n for
all-reduce), and with ``--compare`` the same for torch.distributed's gloo and
mpi4py, run in the same invocation on the same sizes. ``--check-overhead``
adds a column with the mismatch check off; ``--crossover`` times recursive
doubling against the ring to place the small-message threshold.

``--buffers rotate`` (the default) makes every rank, in every library, cycle
through buffer sets that together exceed twice the last-level cache (capped at
physical memory / 8 / nproc), so data comes from memory as in a training step
rather than from the cache; ``--buffers same`` reuses one set, as nccl-tests
does. See ``distrib.bench._rotation`` and ``distrib._machine``.

Memory-traffic fraction: all-reduce tables add ``%mem`` to distrib's column::

    %mem = 100 x (3 x nproc x size / time) / aggregate_copy_rate

``3 x nproc x size`` is the traffic of a single-copy all-reduce (each rank
reads its input, the reduced result is written and read back);
``aggregate_copy_rate`` is measured before the tables with ``nproc``
processes copying buffers of twice the last-level cache at the same time,
counting bytes read plus written (a copy of N bytes counts 2N). See
``distrib.bench._copyrate``.

Extension points: ``COLUMNS`` lists the column providers (a reference column,
say a single-process memory copy, is one more entry); ``--device cuda``
dispatches to ``distrib.bench._gpu.main(args)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._machine import Machine, machine
from ._copyrate import CopyRates, measure_copy_rates, memory_fraction
from ._rotation import BufferMode, footprint, memory_budget, rotation_count
from ._worker import OPS, bus_factor

__all__ = ["COLUMNS", "main", "parse_size"]


def default_peer_python() -> str | None:
    """The interpreter that runs the peers: ``$DISTRIB_PEER_PYTHON``, else this one when
    it can import torch or mpi4py, else ``None`` (no peer columns)."""
    chosen = os.environ.get("DISTRIB_PEER_PYTHON")
    if chosen:
        return chosen
    has_peer = any(importlib.util.find_spec(m) is not None for m in ("torch", "mpi4py"))
    return sys.executable if has_peer else None


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``4K`` -> 4096, ``16M`` -> 16 MiB, ``100`` -> 100 bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 4K, 1M, 256M") from None


def _fmt_size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Header:
    """The header: what the machine is, what its memory can stream, how buffers are used."""

    machine: Machine
    rates: CopyRates
    mode: BufferMode


def probe_machine(nproc: int, mode: BufferMode) -> Header:
    """Read the machine and measure its copy rates (about a second)."""
    hw = machine()
    return Header(hw, measure_copy_rates(hw.llc_bytes, hw.memory_bytes, nproc), mode)


def _print_header(head: Header, nproc: int) -> None:
    hw = head.machine
    print(f"# machine: {hw.describe()}")
    r = head.rates
    print(
        f"# memory copy rate (bytes read + written per s, np.copyto of {_fmt_bytes(r.nbytes)} "
        f"buffers): 1 process {r.one / 1e9:.2f} GB/s; {r.procs} processes at once "
        f"{r.concurrent / 1e9:.2f} GB/s in all"
    )
    if head.mode is BufferMode.ROTATE:
        print(
            f"# buffers: rotate - each rank cycles through buffer sets totalling at least "
            f"2 x last-level cache ({_fmt_bytes(2 * hw.llc_bytes)}), at most "
            f"{_fmt_bytes(memory_budget(hw.memory_bytes, nproc))} (memory / 8 / nproc); "
            f"'bufs' = sets per size"
        )
    else:
        print("# buffers: same - every call reuses one buffer set (data may stay in cache)")
    sys.stdout.flush()


def _with_buffers(plan: list[dict[str, Any]], head: Header, nproc: int) -> list[dict[str, Any]]:
    """``plan`` with each step's ``buffers``: the sets per size every library rotates."""
    hw = head.machine
    out = []
    for step in plan:
        counts = [
            rotation_count(
                footprint(step["op"], s, nproc, step["dtype"]),
                hw.llc_bytes,
                hw.memory_bytes,
                nproc,
            )
            if head.mode is BufferMode.ROTATE
            else 1
            for s in step["sizes"]
        ]
        out.append({**step, "buffers": counts})
    return out


def _run_distrib(args: argparse.Namespace, plan: list[dict[str, Any]], env: dict[str, str]) -> Any:
    from ..testing._ranks import run_local_ranks
    from ._worker import bench_rank

    results = run_local_ranks(
        bench_rank, args.nproc, plan, timeout=args.timeout, group_timeout=args.timeout, env=env
    )
    bad = [r.describe() for r in results if not r.ok]
    if bad:
        raise RuntimeError("distrib ranks failed:\n" + "\n".join(bad))
    return [[step["op"], rows] for step, rows in zip(plan, results[0].value, strict=True)]


def _distrib_column(args: argparse.Namespace, plan: list[dict[str, Any]]) -> Any:
    return _run_distrib(args, plan, {"DISTRIB_TRANSPORT": args.transport})


def _nocheck_column(args: argparse.Namespace, plan: list[dict[str, Any]]) -> Any:
    env = {"DISTRIB_TRANSPORT": args.transport, "DISTRIB_CHECK_MISMATCH": "0"}
    return _run_distrib(args, plan, env)


def _gloo_column(args: argparse.Namespace, plan: list[dict[str, Any]]) -> Any:
    from ._peers import run_gloo

    return run_gloo(args.peer_python, args.nproc, plan, args.timeout)


def _mpi_column(args: argparse.Namespace, plan: list[dict[str, Any]]) -> Any:
    from ._peers import run_mpi4py

    return run_mpi4py(args.peer_python, args.nproc, plan, args.timeout)


def _memcpy_column(args: argparse.Namespace, plan: list[dict[str, Any]]) -> Any:
    from ._copyrate import copy_rate_column  # algbw = 1-process copy rate (reference)

    return copy_rate_column(args, plan)


# (title, enabled(args), run(args, plan) -> [[op, [[size, seconds], ...]], ...])
COLUMNS: list[tuple[str, Callable[[argparse.Namespace], bool], Callable[..., Any]]] = [
    ("distrib", lambda a: True, _distrib_column),
    ("distrib check off", lambda a: a.check_overhead, _nocheck_column),
    ("gloo", lambda a: a.compare and a.peer_python is not None, _gloo_column),
    ("mpi4py", lambda a: a.compare and a.peer_python is not None, _mpi_column),
    ("memcpy 1 proc", lambda a: a.compare, _memcpy_column),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distrib-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="number of local ranks (default 2)")
    p.add_argument(
        "--ops",
        default="all_reduce",
        help=f"comma-separated collectives or 'all' ({', '.join(OPS)})",
    )
    p.add_argument(
        "--sizes",
        default="4K,64K,1M,16M,256M",
        help="comma-separated sizes in bytes (4K, 1M ...); nccl-tests semantics",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--buffers",
        default=BufferMode.ROTATE.value,
        choices=[m.value for m in BufferMode],
        help="rotate (default): each rank cycles through buffers totalling >= 2 x the "
        "last-level cache (at most memory / 8 / nproc), in every library, so data comes "
        "from memory; same: reuse one buffer (data may stay in cache)",
    )
    p.add_argument(
        "--transport",
        default="auto",
        choices=["zmq", "auto", "shm"],
        help="CPU transport for distrib (DISTRIB_TRANSPORT); default auto, what "
        "init_process_group uses (shared memory on one host); zmq forces the ZeroMQ ring",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run torch.distributed (gloo) and mpi4py on the same sizes",
    )
    p.add_argument(
        "--peer-python",
        default=None,
        help="interpreter with torch and/or mpi4py (default: $DISTRIB_PEER_PYTHON, else this "
        "interpreter when it has either)",
    )
    p.add_argument(
        "--check-overhead",
        action="store_true",
        help="add a column with the mismatch check off (DISTRIB_CHECK_MISMATCH=0)",
    )
    p.add_argument(
        "--crossover",
        action="store_true",
        help="time all_reduce with recursive doubling and with the ring at each size",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: benchmark cupy arrays (distrib.bench._gpu)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run all columns this many times, interleaved; report each cell's best",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="bound for each column's run (s)")
    return p


# Columns that get a %mem cell in all-reduce tables.
_MEM_COLUMNS = ("distrib",)


def _print_table(
    op: str,
    args: argparse.Namespace,
    sizes: list[int],
    sets: dict[int, int],
    columns: list[tuple[str, dict[int, float | None]]],
) -> None:
    import numpy as np

    hw: Header = args.machine
    n, itemsize = args.nproc, np.dtype(args.dtype).itemsize
    factor = bus_factor(op, n)
    redop = "sum" if op in ("all_reduce", "reduce", "reduce_scatter") else "none"
    print(
        f"\n# {op}  nproc={n}  transport={args.transport}  dtype={args.dtype}  "
        f"busbw factor={factor:.3f}  buffers={hw.mode.value}"
    )
    with_mem = op == "all_reduce"
    head = f"{'size':>8} {'count':>10} {'type':>8} {'redop':>5} {'bufs':>6}"
    for title, _ in columns:
        head += f" | {title + ' us':>16} {'algbw':>7} {'busbw':>7}"
        if with_mem and title in _MEM_COLUMNS:
            head += f" {'%mem':>6}"
    print(head)
    for size in sizes:
        line = f"{_fmt_size(size):>8} {size // itemsize:>10} {args.dtype:>8} {redop:>5}"
        line += f" {sets.get(size, 1):>6}"
        for title, rows in columns:
            mem = with_mem and title in _MEM_COLUMNS
            t = rows.get(size)
            if t is None:
                line += f" | {'n/a':>16} {'':>7} {'':>7}" + (f" {'':>6}" if mem else "")
                continue
            if op == "barrier":  # moves no data: time only
                line += f" | {t * 1e6:>16.1f} {'-':>7} {'-':>7}"
                continue
            algbw = size / t / 1e9
            line += f" | {t * 1e6:>16.1f} {algbw:>7.3f} {algbw * factor:>7.3f}"
            if mem:
                pct = 100 * memory_fraction(size, t, n, hw.rates.concurrent)
                line += f" {pct:>6.1f}"
        print(line)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distrib-bench`` console script."""
    args = _parser().parse_args(argv)
    if args.device == "cuda":
        from ._gpu import main as gpu_main

        return gpu_main(args)
    if args.nproc < 1:
        raise SystemExit("--nproc must be >= 1")
    ops = list(OPS) if args.ops == "all" else [o.strip() for o in args.ops.split(",")]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; choose from {', '.join(OPS)}")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.peer_python is None:
        args.peer_python = default_peer_python()
    if args.compare and args.peer_python is None:
        print(
            "# note: no interpreter with torch or mpi4py (set --peer-python or "
            "DISTRIB_PEER_PYTHON): skipping the gloo and mpi4py columns"
        )
    args.machine = probe_machine(args.nproc, BufferMode(args.buffers))
    _print_header(args.machine, args.nproc)
    if args.crossover:
        return _crossover(args, sizes)
    # A barrier moves no data: time it once, under the first size's row.
    plan = _with_buffers(
        [
            {"op": op, "sizes": sizes[:1] if op == "barrier" else sizes, "dtype": args.dtype}
            for op in ops
        ],
        args.machine,
        args.nproc,
    )
    best: dict[str, dict[str, dict[int, float | None]]] = {}
    failed: set[str] = set()
    # Columns run interleaved, --repeat times; each cell keeps its best (lowest) time, so
    # noise from other load on the machine hits every column alike.
    for _ in range(args.repeat):
        for title, enabled, run in COLUMNS:
            if not enabled(args) or title in failed:
                continue
            try:
                per_op = run(args, plan)
            except Exception as exc:  # a peer that cannot run is reported, not fatal
                print(f"# note: {title} column skipped: {exc}".splitlines()[0])
                failed.add(title)
                continue
            cells = best.setdefault(title, {})
            for op, rows in per_op:
                for size, t in rows:
                    old = cells.setdefault(op, {}).get(int(size))
                    if t is not None and (old is None or t < old):
                        cells[op][int(size)] = t
    results = list(best.items())
    if args.repeat > 1:
        print(f"# each cell: best of {args.repeat} interleaved runs")
    for step in plan:
        op = step["op"]
        sets = dict(zip(step["sizes"], step["buffers"], strict=True))
        _print_table(
            op, args, sizes, sets, [(title, by_op.get(op, {})) for title, by_op in results]
        )
    return 0


def _crossover(args: argparse.Namespace, sizes: list[int]) -> int:
    """Time recursive doubling vs the ring for all_reduce and print where the ring wins."""
    plan = _with_buffers(
        [
            {"op": "all_reduce", "sizes": sizes, "dtype": args.dtype, "algo": algo}
            for algo in ("rd", "ring")
        ],
        args.machine,
        args.nproc,
    )
    per = _run_distrib(args, plan, {"DISTRIB_TRANSPORT": "zmq"})
    rd, ring = ({int(s): t for s, t in rows} for _, rows in per)
    sets = dict(zip(sizes, plan[0]["buffers"], strict=True))
    _print_table("all_reduce", args, sizes, sets, [("recursive doubling", rd), ("ring", ring)])
    wins = [s for s in sizes if ring[s] < rd[s]]
    print(f"# ring faster from: {_fmt_size(min(wins)) if wins else 'never in this range'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
