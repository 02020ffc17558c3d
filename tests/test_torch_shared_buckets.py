"""DDP's gradient buckets move into shared memory over the "distrib" backend, where the
local peers read them directly; a user's own tensors never move.

Same harness as tests/test_torch_backend.py: spawned ranks, a "distrib" default group
and a gloo group side by side.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from test_torch_backend import _run

torch = pytest.importorskip("torch")  # CI installs torch 2.13.0 CPU: this runs there
import torch.distributed as dist  # noqa: E402


def _train(group, steps=5):
    """Parameters after ``steps`` of DDP on a model whose buckets pass the size at which
    all-reduces read exposed buffers (a 16 MiB and an 8 MiB bucket)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048)
    )
    net = DDP(model, process_group=group, bucket_cap_mb=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    torch.manual_seed(100 + dist.get_rank())
    for _ in range(steps):
        x = torch.randn(4, 1024)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    return net, [p.detach().numpy().copy() for p in net.parameters()]


def _buckets(rank, world, gloo, spare=None):
    from distrib.torch import _tensors
    from distrib.transport.shm._exposed import exposed

    if spare is not None:  # pretend /dev/shm is nearly full
        _tensors._SHM_SPARE = spare
    net, ours = _train(None)
    moved = len(exposed)
    del net
    gc.collect()
    after_free = len(exposed)  # a freed bucket is forgotten with its memory
    _, theirs = _train(gloo)
    same = all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ours, theirs, strict=True))
    # a tensor the user all-reduces again and again stays where it is
    t = torch.ones(8 << 20)
    view, ptr = t.numpy(), t.data_ptr()
    for _ in range(3):
        dist.all_reduce(t)
    user = (t.data_ptr() == ptr, t.untyped_storage().is_shared(), float(view[0]), len(exposed))
    return moved, after_free, same, user


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_buckets_move_to_shared_memory_and_train_as_over_gloo(world):
    for rank, (moved, after_free, same, user) in enumerate(_run(_buckets, world)):
        assert same, f"rank {rank}: DDP over distrib != over gloo"
        assert moved >= 1, f"rank {rank}: no bucket moved into shared memory"
        assert after_free == 0, f"rank {rank}: {after_free} freed buckets still exposed"
        assert user == (True, False, float(world**3), 0), (rank, user)


def _buckets_without_room(rank, world, gloo):
    return _buckets(rank, world, gloo, spare=1 << 60)


@pytest.mark.timeout(300)
def test_nothing_moves_when_dev_shm_lacks_room():
    for rank, (moved, _, same, _) in enumerate(_run(_buckets_without_room, 2)):
        assert same, f"rank {rank}: DDP over distrib != over gloo"
        assert moved == 0, f"rank {rank}: moved {moved} buckets into a full /dev/shm"
