"""Hogwild training with distrib.multiprocessing: the shape of torch's mnist_hogwild.

The parameters of a small MLP live in shared memory, created once by the
parent. Several ``mp.Process`` workers each train on their own shard of
scikit-learn's handwritten digits with plain numpy SGD, writing into the
shared arrays without locks. The parent then evaluates the shared model.

    python examples/hogwild_shared.py [--workers 4] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import distrib.multiprocessing as mp
import distrib.shm as shm


def init_params(n_in: int, n_hidden: int, n_out: int, seed: int) -> dict[str, np.ndarray]:
    """He-initialised MLP parameters, placed in shared memory (like model.share_memory())."""
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, n_hidden)).astype(np.float32),
        "b1": np.zeros(n_hidden, np.float32),
        "w2": rng.normal(0.0, np.sqrt(2.0 / n_hidden), (n_hidden, n_out)).astype(np.float32),
        "b2": np.zeros(n_out, np.float32),
    }
    return {name: shm.share(value) for name, value in params.items()}


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations and class probabilities."""
    hidden = np.maximum(x @ params["w1"] + params["b1"], 0.0)
    logits = hidden @ params["w2"] + params["b2"]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return hidden, probs


def accuracy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(params, x)[1].argmax(axis=1) == y).mean())


def train(
    rank: int,
    args: argparse.Namespace,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    progress,
) -> None:
    """One Hogwild worker: SGD on its shard, updating the shared arrays in place."""
    rng = np.random.default_rng(args.seed + 1 + rank)
    shard = np.arange(rank, len(x), args.workers)
    for epoch in range(args.epochs):
        order = rng.permutation(shard)
        loss = 0.0
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            xb, yb = x[idx], y[idx]
            hidden, probs = forward(params, xb)
            loss += float(-np.log(probs[np.arange(len(yb)), yb] + 1e-9).sum())
            grad_logits = probs
            grad_logits[np.arange(len(yb)), yb] -= 1.0
            grad_logits /= len(yb)
            grad_hidden = (grad_logits @ params["w2"].T) * (hidden > 0)
            # Lock-free in-place updates of the shared parameters (Hogwild).
            params["w2"] -= args.lr * (hidden.T @ grad_logits)
            params["b2"] -= args.lr * grad_logits.sum(axis=0)
            params["w1"] -= args.lr * (xb.T @ grad_hidden)
            params["b1"] -= args.lr * grad_hidden.sum(axis=0)
        progress.put((rank, epoch, loss / len(order)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1) or 1)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be >= 1")

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=args.seed, stratify=digits.target
    )
    params = init_params(x.shape[1], 64, 10, args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test, {args.workers} Hogwild workers")
    print(f"before training: test accuracy {accuracy(params, x_test, y_test):.3f}")

    start = time.perf_counter()
    progress = mp.Queue()
    # The training data travel as shared memory too: one copy, not one per worker.
    x_shared, y_shared = shm.share(x_train), shm.share(y_train)
    workers = [
        mp.Process(target=train, args=(rank, args, params, x_shared, y_shared, progress))
        for rank in range(args.workers)
    ]
    for w in workers:
        w.start()
    for _ in range(args.workers * args.epochs):
        rank, epoch, loss = progress.get(timeout=120)
        if rank == 0:
            acc = accuracy(params, x_test, y_test)  # read the shared model while it trains
            print(
                f"epoch {epoch + 1:2d}/{args.epochs}  worker-0 loss {loss:.4f}  "
                f"test accuracy {acc:.3f}"
            )
    for w in workers:
        w.join(60)
        if w.exitcode != 0:
            raise SystemExit(f"worker {w.name} failed with exit code {w.exitcode}")
    final = accuracy(params, x_test, y_test)
    print(
        f"final test accuracy: {final:.3f} after {time.perf_counter() - start:.1f} s "
        f"({args.workers} workers x {args.epochs} epochs)"
    )


if __name__ == "__main__":
    main()
