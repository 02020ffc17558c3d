"""CPU tensors as numpy arrays for distrib's collectives, and torch's ReduceOp as ours.

A CPU tensor becomes a ``.numpy()`` view (zero-copy): distrib writes results
straight into the tensor's memory. bfloat16, which numpy lacks, is viewed as
int16 where no arithmetic is done (broadcast, gathers, all-to-all, p2p) and
staged through a float32 copy for reductions.

Huge pages: numpy asks the kernel for transparent huge pages on arrays of
4 MiB and more, torch's CPU allocator does not, and distrib's copies and
reductions are memory-bandwidth bound: on the 2-core development machine a
16 MiB all-reduce took 28.8 ms on a tensor's memory against 22.2 ms on a numpy
array's (same engine). A tensor of 4 MiB or more that comes back to the
backend a second time (a DDP bucket, a training loop's buffer) has its pages
collapsed into huge pages once (``madvise`` MADV_HUGEPAGE + MADV_COLLAPSE,
Linux 6.1+; contents and address unchanged; skipped where unsupported).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as _tdist

from .._errors import DistUsageError
from .._reduce_op import ReduceOp

# torch's stubs do not describe the Python ProcessGroup API this module uses.
tdist: Any = _tdist

__all__ = ["Staged", "as_array", "reduce_op"]

_RED = tdist.ReduceOp.RedOpType
# Keyed by the enum's integer value: hashing torch's enum costs ~0.5 us a call.
_OPS = {
    _RED.SUM.value: ReduceOp.SUM,
    _RED.AVG.value: ReduceOp.AVG,
    _RED.PRODUCT.value: ReduceOp.PRODUCT,
    _RED.MIN.value: ReduceOp.MIN,
    _RED.MAX.value: ReduceOp.MAX,
    _RED.BAND.value: ReduceOp.BAND,
    _RED.BOR.value: ReduceOp.BOR,
    _RED.BXOR.value: ReduceOp.BXOR,
}


def reduce_op(op: Any, where: str, rank: int | None = None) -> ReduceOp:
    """distrib's ReduceOp for torch's (``opts.reduceOp``)."""
    kind = getattr(op, "op", op)  # a ReduceOp wraps its RedOpType
    ours = _OPS.get(kind.value) if isinstance(kind, _RED) else None
    if ours is None:
        name = getattr(kind, "name", None) or type(op).__name__
        raise DistUsageError(
            f"{where}: the 'distrib' backend has no reduction {name} (PREMUL_SUM and custom "
            "ops are NCCL-only); use SUM and scale the tensor yourself",
            rank=rank,
            op=where,
        )
    return ours


_HUGE_MIN = 4 << 20  # numpy's own threshold for asking for huge pages
_HUGE = 2 << 20  # the x86-64 / arm64 transparent huge page size
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_SEEN_MAX = 1024  # tensors remembered (address, size): a bounded cache


class _HugePages:
    """Collapse a reused large tensor's pages into huge pages, once per memory range."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], bool] = {}  # range -> collapsed already
        self.madvise: Any = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self.madvise = libc.madvise
            except (OSError, AttributeError):
                self.madvise = None

    def note(self, ptr: int, nbytes: int) -> None:
        if self.madvise is None or nbytes < _HUGE_MIN:
            return
        key = (ptr, nbytes)
        done = self.seen.get(key)
        if done is None:  # first sighting: maybe a one-off tensor, leave it
            if len(self.seen) >= _SEEN_MAX:
                self.seen.clear()
            self.seen[key] = False
            return
        if done:
            return
        self.seen[key] = True
        start = (ptr + _HUGE - 1) // _HUGE * _HUGE
        end = (ptr + nbytes) // _HUGE * _HUGE
        if end > start:  # failures (old kernel, THP off) leave the memory as it was
            self.madvise(start, end - start, _MADV_HUGEPAGE)
            self.madvise(start, end - start, _MADV_COLLAPSE)


_huge_pages = _HugePages()


class Staged:
    """Arrays handed to distrib for a list of tensors, and the copies back afterwards."""

    def __init__(self) -> None:
        self.copy_back: list[Callable[[], object]] = []

    def finish(self) -> None:
        for fn in self.copy_back:
            fn()

    def stand_in(self, t: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        """Run on ``copy`` instead of ``t``; ``finish`` writes it back into ``t``."""
        self.copy_back.append(lambda: t.copy_(copy))
        return copy


def as_array(
    t: Any, arg: str, where: str, staged: Staged, arithmetic: bool, rank: int | None = None
) -> np.ndarray:
    """A numpy view of CPU tensor ``t`` (a staged float32 copy for bfloat16 reductions)."""
    arr = _plain_view(t)
    if arr is None:  # not a plain CPU tensor: say why, or detach / stage it
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise DistUsageError(
                f"{where}: {arg} is on {t.device}; the 'distrib' torch backend runs CPU "
                "tensors only. For CUDA tensors use a 'nccl' process group (dist.new_group("
                "backend='nccl')), or distrib's own collectives on cupy arrays "
                "(distrib.all_reduce)",
                rank=rank,
                op=where,
            )
        if t.layout != torch.strided:
            raise DistUsageError(
                f"{where}: {arg} is a {t.layout} tensor; the 'distrib' torch backend runs "
                "dense tensors only. Pass t.to_dense(), or use a 'gloo' process group "
                "(dist.new_group(backend='gloo')), which reduces sparse COO tensors",
                rank=rank,
                op=where,
            )
        t = t.detach()
        if t.is_neg() or t.is_conj():  # lazy negation / conjugation: no memory to view
            return _resolved(t, arg, where, staged, arithmetic, rank)
        if t.dtype == torch.bfloat16:
            return _bfloat16(t, staged, arithmetic)
        arr = t.numpy()
    _huge_pages.note(t.data_ptr(), arr.nbytes)
    if arr.dtype.kind == "c" and not arithmetic:
        return torch.view_as_real(t).numpy()
    return arr


def _plain_view(t: Any) -> np.ndarray | None:
    """``t.numpy()`` for the common case, a plain CPU tensor without grad, else None.

    torch's own ``.numpy()`` checks device and dtype, so this costs one call; what it
    refuses (CUDA, bfloat16, conjugate views...) goes the long way in ``as_array``.
    """
    if type(t) is not torch.Tensor or t.requires_grad:
        return None
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        return None


def _resolved(
    t: torch.Tensor, arg: str, where: str, staged: Staged, arithmetic: bool, rank: int | None
) -> np.ndarray:
    """A lazily negated or conjugated view: run on a resolved copy, write results back."""
    copy = staged.stand_in(t, t.resolve_neg().resolve_conj())
    return as_array(copy, arg, where, staged, arithmetic, rank)


def _bfloat16(t: torch.Tensor, staged: Staged, arithmetic: bool) -> np.ndarray:
    """bfloat16, which numpy lacks: raw 16-bit words to move, a float32 copy to reduce."""
    if not arithmetic:
        return t.view(torch.int16).numpy()
    return staged.stand_in(t, t.float()).numpy()
