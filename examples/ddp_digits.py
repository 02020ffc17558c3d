"""Synchronous data-parallel training of an MLP on scikit-learn's handwritten digits.

Every rank holds a replica of the model (plain numpy, hand-written backward),
reads its own shard of each global batch through ``DistributedSampler`` and
hands its gradients to ``DistributedDataParallel`` as backward produces them,
last layer first, so the first bucket's all-reduce overlaps the rest of
backward. With ``--batch-size B`` as the *global* batch, ``--nproc 1`` and
``--nproc 4`` (B/4 per rank) train the same model up to float rounding.

    distrib-run --nproc 4 examples/ddp_digits.py          # under the launcher
    python examples/ddp_digits.py --nproc 4               # spawns its own workers
    python examples/ddp_digits.py                         # one process

Rank 0 shows a progress bar, saves a plot of the learning curve (``--plot``)
and prints ``test accuracy: <x>`` last; the exit status is 0 when it reaches
``--target`` (default 0.95).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from typing import Any

import numpy as np

import distrib
from distrib.data import DistributedSampler
from distrib.optim import SGD
from distrib.parallel import DistributedDataParallel

# ---------------------------------------------------------------- data and model


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 1797 8x8 digits, scaled to [0, 1], split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float64) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


def init_mlp(sizes: list[int], seed: int) -> dict[str, np.ndarray]:
    """He-initialised dense layers ``w0, b0, w1, b1, ...`` in forward order."""
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)
        params[f"b{i}"] = np.zeros(n_out)
    return params


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and the activations backward needs (ReLU hidden layers)."""
    n_layers = len(params) // 2
    acts = [x]
    h = x
    for i in range(n_layers):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
        acts.append(h)
    return h, acts


def loss_and_backward(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, on_grad: Any
) -> float:
    """Mean cross-entropy; ``on_grad(name, grad)`` gets each gradient, last layer first."""
    logits, acts = forward(params, x)
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    d = p
    d[np.arange(n), y] -= 1.0
    d /= n
    for i in reversed(range(len(params) // 2)):
        on_grad(f"w{i}", acts[i].T @ d)
        on_grad(f"b{i}", d.sum(axis=0))
        if i:
            d = (d @ params[f"w{i}"].T) * (acts[i] > 0)
    return loss


def accuracy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    logits, _ = forward(params, x)
    return float((logits.argmax(axis=1) == y).mean())


# ---------------------------------------------------------------- training


def train(args: argparse.Namespace) -> float:
    """Train on this rank's shards; return the test accuracy (identical on every rank)."""
    rank, world = distrib.get_rank(), distrib.get_world_size()
    if args.batch_size % world:
        raise SystemExit(
            f"--batch-size {args.batch_size} must divide by the world size {world} "
            "(it is the global batch)"
        )
    local_batch = args.batch_size // world
    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    params = init_mlp([64, *args.hidden, 10], args.seed + rank)  # rank 0's wins: broadcast
    ddp = DistributedDataParallel(params, bucket_cap_mb=args.bucket_cap_mb, first_bucket_mb=0.01)
    opt = SGD(params, lr=args.lr, momentum=0.9)
    sampler = DistributedSampler(
        len(x_tr), world, rank, shuffle=True, seed=args.seed, drop_last=True
    )
    steps_per_epoch = len(x_tr) // args.batch_size  # same on any world size
    history: list[tuple[float, float]] = []
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.epochs, desc=f"digits x{world}", unit="epoch", file=sys.stderr)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        idx = sampler.indices()
        losses = []
        for step in range(steps_per_epoch):
            batch = idx[step * local_batch : (step + 1) * local_batch]
            losses.append(loss_and_backward(params, x_tr[batch], y_tr[batch], ddp.grad_ready))
            opt.step(ddp.synchronize())
        history.append((float(np.mean(losses)), accuracy(params, x_te, y_te)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1][0]:.3f}", test_acc=f"{history[-1][1]:.3f}")
    if bar is not None:
        bar.close()
    acc = accuracy(params, x_te, y_te)
    if rank == 0:
        if args.save:
            np.savez(args.save, **params)
        if not args.no_plot:
            plot(history, args.plot, world)
            print(f"learning curve: {args.plot}")
        print(f"test accuracy: {acc:.4f}", flush=True)
    return acc


def plot(history: list[tuple[float, float]], path: str, world: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    loss = [h[0] for h in history]
    acc = [h[1] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    (l1,) = ax.plot(range(1, len(loss) + 1), loss, label="train loss")
    ax2 = ax.twinx()
    (l2,) = ax2.plot(range(1, len(acc) + 1), acc, color="C1", label="test accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2.set_ylabel("accuracy")
    ax.set_title(f"DDP MLP on sklearn digits, {world} rank(s)")
    ax.legend(handles=[l1, l2], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spawned_worker(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    distrib.init_process_group(init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        train(args)
    finally:
        distrib.destroy_process_group()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=1, help="processes to spawn without a launcher")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (divided among ranks)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bucket-cap-mb", type=float, default=25)
    ap.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
    ap.add_argument("--save", default=None, help="save final parameters (.npz) from rank 0")
    ap.add_argument("--plot", default="/tmp/distrib-examples/ddp_digits.png")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.nproc < 1:
        ap.error(f"--nproc must be >= 1, got {args.nproc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under distrib-run / torchrun
        distrib.init_process_group()
        try:
            acc = train(args)
        finally:
            distrib.destroy_process_group()
        return 0 if acc >= args.target else 1
    if args.nproc == 1:
        distrib.init_process_group(rank=0, world_size=1)  # a private one-rank group
        try:
            acc = train(args)
        finally:
            distrib.destroy_process_group()
        return 0 if acc >= args.target else 1
    import distrib.multiprocessing as dmp

    # One BLAS thread per rank unless the user chose otherwise (as distrib-run does):
    # N ranks each starting a thread per core would oversubscribe the machine.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    # The ranks meet through a file store in a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="ddp-digits-") as tmp:
        store = os.path.join(tmp, "store")
        dmp.spawn(_spawned_worker, args=(args.nproc, store, args), nprocs=args.nproc)
    return 0  # rank 0 printed the accuracy; a failing rank raised above


if __name__ == "__main__":
    sys.exit(main())
