"""CPU tensors as numpy arrays for distrib's collectives, and torch's ReduceOp as ours.

A CPU tensor becomes a ``.numpy()`` view (zero-copy): distrib writes results
straight into the tensor's memory. bfloat16, which numpy lacks, is viewed as
int16 where no arithmetic is done (broadcast, gathers, all-to-all, p2p) and
staged through a float32 copy for reductions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as _tdist

from .._errors import DistUsageError
from ..comm._ops import ReduceOp

# torch's stubs do not describe the Python ProcessGroup API this module uses.
tdist: Any = _tdist

__all__ = ["Staged", "as_array", "reduce_op"]

_RED = tdist.ReduceOp.RedOpType
_OPS = {
    _RED.SUM: ReduceOp.SUM,
    _RED.AVG: ReduceOp.AVG,
    _RED.PRODUCT: ReduceOp.PRODUCT,
    _RED.MIN: ReduceOp.MIN,
    _RED.MAX: ReduceOp.MAX,
    _RED.BAND: ReduceOp.BAND,
    _RED.BOR: ReduceOp.BOR,
    _RED.BXOR: ReduceOp.BXOR,
}


def reduce_op(op: Any, where: str) -> ReduceOp:
    """distrib's ReduceOp for torch's (``opts.reduceOp``)."""
    kind = getattr(op, "op", op)  # a ReduceOp wraps its RedOpType
    try:
        return _OPS[kind]
    except (KeyError, TypeError):
        raise DistUsageError(
            f"{where}: the 'distrib' backend has no reduction {op!r} (PREMUL_SUM and custom "
            "ops are NCCL-only); use SUM and scale the tensor yourself",
            op=where,
        ) from None


class Staged:
    """Arrays handed to distrib for a list of tensors, and the copies back afterwards."""

    def __init__(self) -> None:
        self.copy_back: list[Callable[[], None]] = []

    def finish(self) -> None:
        for fn in self.copy_back:
            fn()


def as_array(t: Any, arg: str, where: str, staged: Staged, arithmetic: bool) -> np.ndarray:
    """A numpy view of CPU tensor ``t`` (a staged float32 copy for bfloat16 reductions)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise DistUsageError(
            f"{where}: {arg} is on {t.device}; the 'distrib' torch backend runs CPU tensors "
            "only. For CUDA tensors use a 'nccl' process group (dist.new_group(backend='nccl')"
            "), or distrib's own collectives on cupy arrays (distrib.all_reduce)",
            op=where,
        )
    t = t.detach()
    if t.dtype == torch.bfloat16:
        if not arithmetic:
            return t.view(torch.int16).numpy()
        copy = t.float()

        def back(t: torch.Tensor = t, copy: torch.Tensor = copy) -> None:
            t.copy_(copy)

        staged.copy_back.append(back)
        return copy.numpy()
    if t.is_complex() and not arithmetic:
        return torch.view_as_real(t).numpy()
    return t.numpy()
