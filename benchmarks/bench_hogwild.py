"""Hogwild A3C throughput: environment steps per second for 1, 2, 4, ... workers.

Runs the A3C workers of ``examples/a3c_cartpole.py`` (shared parameters and a
shared Adam in ``distrib.shm``, no locks) without stopping at "solved", and
counts environment steps over a fixed window after a warm-up. Scaling
efficiency at N workers is steps/s at N over N x steps/s at 1; it can only be
expected to hold up to the number of cores (beyond that workers share cores).

The ``private`` columns run the same workers with *unshared* parameters and
optimizers (N independent learners, nothing shared but the step counters):
their efficiency is what this machine gives N copies of this workload (turbo
clocks that drop as more cores run, hyper-threads, memory), so the gap
between the two is what sharing the parameters costs.

    flock /tmp/distrib-bench.lock python benchmarks/bench_hogwild.py
    python benchmarks/bench_hogwild.py --workers 1 2 4 8 16 --seconds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

# One BLAS thread per worker, as in the example (set before numpy loads).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import distrib.multiprocessing as mp  # noqa: E402
from distrib import shm  # noqa: E402
from distrib.optim import Adam  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "a3c_cartpole.py")


def load_example():
    """Import examples/a3c_cartpole.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("a3c_cartpole", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["a3c_cartpole"] = module  # picklable by name under spawn
    spec.loader.exec_module(module)
    return module


def private_worker(index, params, settings, episodes, stop, counts) -> None:
    """One A3C worker with its own copy of the parameters and its own optimizer."""
    a3c = sys.modules.get("a3c_cartpole") or load_example()
    own = {k: np.array(v, copy=True) for k, v in params.items()}
    a3c.worker_loop(index, own, Adam(own, lr=settings.lr), episodes, stop, counts, settings)


def measure(
    a3c, workers: int, env: str, warmup: float, window: float, seed: int, shared: bool = True
) -> float:
    """Environment steps per second of ``workers`` Hogwild workers over ``window`` seconds.

    ``shared=False``: the same workers, each with private parameters (the baseline).
    """
    settings = a3c.Settings(env=env, workers=workers, seed=seed)
    _, obs_dim, n_actions = a3c.env_threshold(env)
    params = {
        k: shm.share(v)
        for k, v in a3c.init_params(obs_dim, n_actions, settings.hidden, seed).items()
    }
    stop = shm.zeros(1, dtype=np.int8)
    counts = shm.zeros(workers, dtype=np.int64)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    episodes = ctx.SimpleQueue()
    if shared:
        optimizer = Adam(params, lr=settings.lr).share_memory()
        target, extra = a3c.worker_loop, (optimizer, episodes, stop, counts, settings)
        args = [(i, params, *extra) for i in range(workers)]
    else:
        target = private_worker
        args = [(i, params, settings, episodes, stop, counts) for i in range(workers)]
    procs = [ctx.Process(target=target, args=a, daemon=True) for a in args]
    for p in procs:
        p.start()
    try:
        # Drain episode reports so workers never block on a full pipe.
        def drain_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                while not episodes.empty():
                    episodes.get()
                time.sleep(0.01)

        drain_for(warmup)
        n0, t0 = int(counts.sum()), time.monotonic()
        drain_for(window)
        n1, t1 = int(counts.sum()), time.monotonic()
    finally:
        stop[0] = 1
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return (n1 - n0) / (t1 - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = os.cpu_count() or 1
    default = [1, 2, 4] + [n for n in (8, 16) if n <= cores]
    ap.add_argument("--workers", type=int, nargs="+", default=default)
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured window per row")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    a3c = load_example()
    workers = args.workers if 1 in args.workers else [1, *args.workers]
    print(
        f"# Hogwild A3C on {args.env}: {cores} cores, {args.seconds:.0f} s window after "
        f"{args.warmup:.0f} s warm-up; eff = rate(N) / (N x rate(1))"
    )
    print(
        f"{'workers':>7} | {'env steps/s':>11} {'per worker':>10} {'eff':>5} | "
        f"{'private steps/s':>15} {'eff':>5} | {'shared/private':>14}"
    )
    print("-" * 78)
    base = base_private = None
    for n in workers:
        rate = measure(a3c, n, args.env, args.warmup, args.seconds, args.seed)
        private = measure(a3c, n, args.env, args.warmup, args.seconds, args.seed, shared=False)
        base = rate if base is None else base
        base_private = private if base_private is None else base_private
        note = "" if n <= cores else "  (more workers than cores)"
        print(
            f"{n:>7} | {rate:>11.0f} {rate / n:>10.0f} {rate / (n * base):>5.2f} | "
            f"{private:>15.0f} {private / (n * base_private):>5.2f} | {rate / private:>14.2f}"
            f"{note}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
