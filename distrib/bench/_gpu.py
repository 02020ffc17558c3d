"""``distrib-bench --device cuda``: all-reduce bus bandwidth of ranks sharing one GPU.

For each size, 2 and 4 processes on one GPU all-reduce float32 buffers through
the CUDA-IPC engine (control handshakes included); beside them, in the same
run, the device's own copy rate: bytes copied per second by one
device-to-device copy of that size. busbw is computed as nccl-tests does:
size / time * 2(n-1)/n. An all-reduce of two buffers must read and write each
twice, so busbw / copy rate is at most 50% for two ranks.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

__all__ = ["main"]

_MIB = 1 << 20
_DEFAULT_SIZES = "1M,4M,16M,64M,256M,1G"


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": _MIB, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _iters_for(nbytes: int) -> int:
    # ~20 ms of device traffic per point at ~3 TB/s, at least 10 and at most 300 calls
    return max(10, min(300, int(60e9 / max(nbytes, 1) / 1000)))


def _copy_rate(sizes: list[int], reps: int) -> dict[int, float]:
    """Bytes per second of one device-to-device copy of each size (median of ``reps``)."""
    import cupy

    rates = {}
    for nbytes in sizes:
        src = cupy.random.random(nbytes // 4, dtype=cupy.float32)
        dst = cupy.empty_like(src)
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        for _ in range(3):
            dst[...] = src
        times = []
        for _ in range(reps):
            start.record()
            cupy.cuda.runtime.memcpyAsync(
                dst.data.ptr, src.data.ptr, nbytes, 3, cupy.cuda.get_current_stream().ptr
            )
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        rates[nbytes] = nbytes / statistics.median(times)
        del src, dst
    return rates


def _worker(rank: int, size: int, port: int, sizes: list[int], out: Any) -> None:
    import cupy

    from distrib._reduce_op import ReduceOp
    from distrib.store import PrefixStore, TCPStore
    from distrib.transport.gpu._ipc_engine import CudaIpcEngine

    store = PrefixStore(f"bench{size}", TCPStore("127.0.0.1", port, is_master=False, timeout=120))
    cupy.cuda.Device(0).use()
    engine = CudaIpcEngine(store, rank, size, 0, time.monotonic() + 120)
    seq = 0
    try:
        for nbytes in sizes:
            buf = cupy.random.random(nbytes // 4, dtype=cupy.float32)
            check = buf.copy()
            deadline = time.monotonic() + 300
            iters = _iters_for(nbytes)
            for _ in range(3):  # warm-up: kernel compile, handle open
                seq += 1
                engine.all_reduce(buf, ReduceOp.SUM, seq, deadline, call=None)
            times = []
            for _ in range(3):
                seq += 1
                engine.barrier(seq, deadline, call=None)
                t0 = time.perf_counter()
                for _ in range(iters):
                    seq += 1
                    engine.all_reduce(buf, ReduceOp.SUM, seq, deadline, call=None)
                seq += 1
                engine.barrier(seq, deadline, call=None)  # includes every rank's stream sync
                times.append((time.perf_counter() - t0) / iters)
            del check
            if rank == 0:
                out.put((size, nbytes, min(times)))
            del buf
    finally:
        engine.close()
        store.close()


def run(sizes: list[int], ranks: list[int], reps: int = 20) -> list[dict[str, Any]]:
    """Measure and return one row per (ranks, size)."""
    import cupy

    from distrib.store import TCPStore

    rates = _copy_rate(sizes, reps)
    cupy.get_default_memory_pool().free_all_blocks()
    rows = []
    ctx = mp.get_context("spawn")
    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=120)
    try:
        for n in ranks:
            out = ctx.Queue()
            procs = [
                ctx.Process(target=_worker, args=(r, n, master.port, sizes, out)) for r in range(n)
            ]
            for p in procs:
                p.start()
            results = {}
            for _ in sizes:
                _, nbytes, t = out.get(timeout=600)
                results[nbytes] = t
            for p in procs:
                p.join(timeout=60)
                if p.exitcode != 0:
                    raise RuntimeError(f"bench worker exited with {p.exitcode}")
            for nbytes in sizes:
                t = results[nbytes]
                busbw = nbytes / t * 2 * (n - 1) / n
                rows.append(
                    {
                        "ranks": n,
                        "bytes": nbytes,
                        "time_us": t * 1e6,
                        "busbw": busbw,
                        "copy": rates[nbytes],
                        "ratio": busbw / rates[nbytes],
                    }
                )
    finally:
        master.close()
    return rows


def _fmt_size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / _MIB:g} MiB"


def format_table(rows: list[dict[str, Any]], device: str) -> str:
    lines = [
        f"all_reduce float32, ranks sharing one GPU ({device}); CUDA-IPC engine",
        f"{'ranks':>5} {'size':>9} {'time us':>10} {'busbw GB/s':>11} "
        f"{'D2D copy GB/s':>14} {'busbw/copy':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r['ranks']:>5} {_fmt_size(r['bytes']):>9} {r['time_us']:>10.1f} "
            f"{r['busbw'] / 1e9:>11.1f} {r['copy'] / 1e9:>14.1f} {r['ratio'] * 100:>9.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | argparse.Namespace | None = None) -> int:
    """Entry point of ``distrib-bench --device cuda`` (also ``python -m distrib.bench._gpu``).

    ``distrib-bench`` hands over its parsed namespace; then the GPU defaults
    apply (1 MiB .. 1 GiB, 2 and 4 ranks). Run as a module it takes
    ``--sizes`` and ``--ranks``.
    """
    parser = argparse.ArgumentParser(prog="distrib-bench --device cuda", description=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda"])
    parser.add_argument("--sizes", default=_DEFAULT_SIZES, help="comma list, e.g. 1M,256M,1G")
    parser.add_argument("--ranks", default="2,4", help="comma list of process counts")
    if isinstance(argv, argparse.Namespace):
        args = parser.parse_args([])
    else:
        args, _unknown = parser.parse_known_args(argv)
    try:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception as exc:
        print(f"distrib-bench --device cuda: no usable cupy/CUDA device here ({exc})")
        return 2
    sizes = [_parse_size(s) for s in args.sizes.split(",") if s]
    ranks = [int(r) for r in args.ranks.split(",") if r]
    rows = run(sizes, ranks)
    print(format_table(rows, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
