"""GPU Hogwild: processes share one set of cupy parameters by CUDA IPC and update them lock-free.

Each worker fits the same linear model on its own random batches and writes
its SGD steps straight into the shared parameters (the parent's device
memory, mapped into every worker: nothing goes through the host). Run:

    python examples/hogwild_gpu.py --workers 4 --steps 300

Needs cupy and a CUDA device. The parent must outlive the workers' use of the
parameters (it joins them before reading the result).
"""

from __future__ import annotations

import argparse
import sys
import time

import distrib.multiprocessing as mp
from distrib.optim import SGD


def worker(rank: int, params: dict, w_true, steps: int, lr: float, batch: int, done) -> None:
    import cupy

    rng = cupy.random.default_rng(1000 + rank)
    opt = SGD(params, lr=lr)  # updates the shared arrays in place
    dim = w_true.shape[0]
    for _ in range(steps):
        x = rng.standard_normal((batch, dim), dtype=cupy.float32)
        y = x @ w_true + 0.5 + 0.01 * rng.standard_normal(batch, dtype=cupy.float32)
        err = x @ params["w"] + params["b"] - y
        opt.step({"w": x.T @ err / batch, "b": err.mean(keepdims=True)})
    cupy.cuda.get_current_stream().synchronize()
    done.put(rank)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        print(f"hogwild_gpu: needs cupy and a CUDA device ({exc})")
        return 2
    w_true = cupy.random.default_rng(0).standard_normal(args.dim, dtype=cupy.float32)
    params = {"w": cupy.zeros(args.dim, dtype=cupy.float32), "b": cupy.zeros(1, cupy.float32)}
    start_err = float(cupy.linalg.norm(params["w"] - w_true))
    ctx = mp.get_context("spawn")  # CUDA does not survive fork
    done = ctx.Queue()
    t0 = time.perf_counter()
    procs = [
        ctx.Process(target=worker, args=(r, params, w_true, args.steps, args.lr, args.batch, done))
        for r in range(args.workers)
    ]
    for p in procs:
        p.start()
    finished = [done.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    elapsed = time.perf_counter() - t0
    err = float(cupy.linalg.norm(params["w"] - w_true))
    bias = float(params["b"][0])
    print(
        f"{len(finished)} workers x {args.steps} steps in {elapsed:.1f}s: "
        f"|w - w_true| {start_err:.3f} -> {err:.4f}, b = {bias:.3f} (true 0.5)"
    )
    ok = err < 0.05 * start_err and abs(bias - 0.5) < 0.05
    print("converged" if ok else "did NOT converge")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
