"""distrib's DistributedDataParallel driving a torch model on CPU, without copies.

A torch CPU tensor's ``.numpy()`` is a view of the same memory, so distrib can
broadcast a torch model's parameters and average its gradients in place. Each
parameter gets a post-accumulate-grad hook that hands ``p.grad.numpy()`` to
``ddp.grad_ready`` the moment autograd produces it, so buckets are reduced
while backward is still running; ``ddp.synchronize()`` then leaves the average
in ``p.grad`` for any torch optimizer.

    python examples/torch_ddp_interop.py --nproc 2      # spawns its own ranks
    distrib-run --nproc 2 examples/torch_ddp_interop.py

Rank 0 also trains the same model on the full batches in one process and
prints the largest parameter difference (it should be float rounding only),
then ``torch interop: max |param difference| = <x>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

import distrib
from distrib.parallel import DistributedDataParallel


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    ).double()


def make_data(steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(steps, batch, 20, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=2, keepdim=True))
    return x, y


def train_ddp(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Train on this rank's slice of every global batch; return the final parameters."""
    rank, world = distrib.get_rank(), distrib.get_world_size()
    model = make_model(seed=rank)  # different on purpose: DDP broadcasts rank 0's
    params = {name: p.detach().numpy() for name, p in model.named_parameters()}
    ddp = DistributedDataParallel(params, first_bucket_mb=0.01)
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: ddp.grad_ready(name, p.grad.numpy())
        )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x, y = make_data(args.steps, args.batch_size)
    local = args.batch_size // world
    for step in range(args.steps):
        xs = x[step, rank * local : (rank + 1) * local]
        ys = y[step, rank * local : (rank + 1) * local]
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(xs), ys).backward()  # hooks hand grads in
        ddp.synchronize()  # p.grad now holds the average over ranks
        opt.step()
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def train_single(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The reference: the same model and global batches in one process."""
    model = make_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x, y = make_data(args.steps, args.batch_size)
    for step in range(args.steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[step]), y[step]).backward()
        opt.step()
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def run(args: argparse.Namespace) -> None:
    if args.batch_size % distrib.get_world_size():
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the world size")
    ours = train_ddp(args)
    gathered: list = [None] * distrib.get_world_size()
    distrib.all_gather_object(gathered, {k: v.tolist() for k, v in ours.items()})
    if distrib.get_rank() == 0:
        for r, other in enumerate(gathered):
            for k, v in ours.items():
                if not np.array_equal(np.asarray(other[k]), v):
                    raise SystemExit(f"rank {r} ended with different parameters ({k})")
        ref = train_single(args)
        diff = max(float(np.abs(ours[k] - ref[k]).max()) for k in ref)
        print(f"torch interop: max |param difference| = {diff:.3g}", flush=True)
        if diff > 1e-9:
            raise SystemExit("data-parallel result differs from single-process training")


def _spawned(rank: int, world: int, store: str, args: argparse.Namespace) -> None:
    distrib.init_process_group(init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        run(args)
    finally:
        distrib.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under a launcher
        distrib.init_process_group()
        try:
            run(args)
        finally:
            distrib.destroy_process_group()
        return 0
    import distrib.multiprocessing as dmp

    with tempfile.TemporaryDirectory(prefix="torch-interop-") as tmp:
        store = os.path.join(tmp, "store")
        dmp.spawn(_spawned, args=(args.nproc, store, args), nprocs=args.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
