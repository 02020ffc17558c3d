"""Elastic data-parallel training that survives losing and gaining nodes.

Run it under ``distrib-run --rdzv-backend c10d --nnodes MIN:MAX`` (or torchrun):
every restart or re-formed group starts the script again with a new
``WORLD_SIZE``; it resumes from the last ``distrib.checkpoint`` and carries on.
Each step uses the same global batch whatever the world size (every rank takes
its shard, gradients are summed and divided by the global batch), so the model
after ``--steps`` steps is the same, up to float rounding, however often the
group changed size on the way.

    distrib-run --rdzv-backend c10d --rdzv-endpoint HOST:29400 --nnodes 2:3 \\
        --max-restarts 3 --nproc 1 examples/elastic_ddp.py --checkpoint /shared/ck.bin

Prints ``resumed at step S with world size W`` on each (re)start and
``final accuracy: A`` at the end (rank 0); exit 0 when it reaches ``--target``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import distrib
from distrib import checkpoint


def make_data(seed: int = 0, n: int = 2048, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs, linearly separable up to a little noise."""
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal(dim)
    x = rng.standard_normal((n, dim))
    y = (x @ w_true + 0.3 * rng.standard_normal(n) > 0).astype(np.float64)
    return x, y


def gradient(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Summed logistic-loss gradient over the rows of ``x`` (bias in the last column)."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    p = 1.0 / (1.0 + np.exp(-(xb @ w)))
    return xb.T @ (p - y)


def accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    xb = np.hstack([x, np.ones((len(x), 1))])
    return float(np.mean(((xb @ w) > 0) == (y > 0.5)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=256, help="global batch per step")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--checkpoint", default="elastic_ddp.ckpt")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--step-time", type=float, default=0.0, help="sleep per step (demos, tests)")
    p.add_argument("--progress-dir", default=None, help="write a file per saved step (tests)")
    p.add_argument("--target", type=float, default=0.9)
    args = p.parse_args(argv)

    distrib.init_process_group()
    rank, world = distrib.get_rank(), distrib.get_world_size()
    x, y = make_data()
    w = np.zeros(x.shape[1] + 1)
    step = 0
    if os.path.exists(args.checkpoint):
        ck = checkpoint.load(args.checkpoint)
        w, step = ck.arrays["w"], int(ck.metadata["step"])
    restarts = os.environ.get("DISTRIB_RESTART_COUNT", os.environ.get("TORCHELASTIC_RESTART_COUNT"))
    if rank == 0:
        print(
            f"resumed at step {step} with world size {world} (restart count {restarts})", flush=True
        )

    order = np.random.default_rng(1).permutation(len(x))
    while step < args.steps:
        start = (step * args.batch_size) % len(x)
        batch = order[np.arange(start, start + args.batch_size) % len(x)]
        mine = np.array_split(batch, world)[rank]  # same global batch at any world size
        g = gradient(w, x[mine], y[mine])
        distrib.all_reduce(g)
        w = w - args.lr * g / args.batch_size
        step += 1
        if step % args.save_every == 0 or step == args.steps:
            checkpoint.save(args.checkpoint, {"w": w}, {"step": step, "world": world})
            if rank == 0 and args.progress_dir:
                path = os.path.join(args.progress_dir, f"step_{step}_world_{world}")
                with open(path, "w") as f:
                    f.write(f"{step}\n")
        time.sleep(args.step_time)
    acc = accuracy(w, x, y)
    if rank == 0:
        print(f"final accuracy: {acc:.6f} weights: {np.round(w[:3], 6).tolist()}", flush=True)
    distrib.destroy_process_group()
    return 0 if acc >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
