"""Gradient buckets: which parameters share one flat buffer, and views into it.

Buckets are filled in reverse registration order, the order a backward pass
produces gradients (last layer first), so the first bucket fills early. The
first bucket is small (``first_bucket_mb``) so its all-reduce starts as soon as
possible; optionally so is the last (``last_bucket_mb``: the first layers'
gradients, which backward produces last), since nothing overlaps the
communication that follows the last gradient. The others are up to
``bucket_cap_mb``. Each bucket holds one dtype
and owns one flat buffer that lives for the life of the model: gradients are
views into it, so nothing is allocated per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Bucket", "ParamSpec", "assign_buckets", "build_buckets"]


@dataclass(frozen=True)
class ParamSpec:
    """Name, shape and dtype of one parameter, in registration order."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Bucket:
    """One flat gradient buffer, the parameters it holds, and its per-step state."""

    index: int
    names: list[str]
    dtype: np.dtype
    flat: Any  # 1-D contiguous array, numel = sum of the parameters' numel
    offsets: dict[str, tuple[int, int]]  # name -> (start, stop) in ``flat``
    views: dict[str, Any] = field(default_factory=dict)  # name -> view shaped like the param
    ready: set[str] = field(default_factory=set)  # names handed in this step
    work: Any = None  # the in-flight all-reduce (a Work), or None
    comm_buf: Any = None  # the hook's scratch buffer (e.g. float16), reused across steps
    sent: Any = None  # the buffer the in-flight all-reduce works on (flat or comm_buf)

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes)

    @property
    def full(self) -> bool:
        return len(self.ready) == len(self.names)


def assign_buckets(
    specs: Sequence[ParamSpec],
    *,
    first_cap_bytes: int,
    cap_bytes: int,
    last_cap_bytes: int | None = None,
) -> list[list[str]]:
    """Group parameter names into buckets, walking ``specs`` in reverse order.

    A bucket closes when adding the next parameter would pass its cap (the
    first bucket's cap is ``first_cap_bytes``) or when the dtype changes; a
    parameter larger than the cap gets a bucket of its own. With
    ``last_cap_bytes``, the parameters registered first (their gradients come
    last) form a final bucket: the first parameter, however large, and those
    after it while they add at most ``last_cap_bytes`` (and ``cap_bytes``): a
    first layer's weight and its bias, say, whose gradients arrive together.
    The tail never takes parameters of the first bucket.
    """
    caps = (first_cap_bytes, cap_bytes) + (() if last_cap_bytes is None else (last_cap_bytes,))
    if min(caps) <= 0:
        raise ValueError(
            f"bucket caps must be > 0 bytes, got first={first_cap_bytes} cap={cap_bytes} "
            f"last={last_cap_bytes}"
        )
    buckets = _greedy(specs, first_cap_bytes, cap_bytes)
    if last_cap_bytes is None or len(buckets) < 2:
        return buckets
    # The last bucket never reaches into the first one (the greedy walk's first
    # bucket is the same with or without it), nor past the ordinary cap.
    free = len(specs) - len(buckets[0])
    limit = min(last_cap_bytes, cap_bytes)
    tail, added = 1, 0  # specs[:tail] make up the last bucket
    while tail < free and specs[tail].dtype == specs[0].dtype:
        if added + specs[tail].nbytes > limit:
            break
        added += specs[tail].nbytes
        tail += 1
    return [
        *_greedy(specs[tail:], first_cap_bytes, cap_bytes),
        [s.name for s in reversed(specs[:tail])],
    ]


def _greedy(specs: Sequence[ParamSpec], first_cap_bytes: int, cap_bytes: int) -> list[list[str]]:
    """Buckets in reverse order, each closed before it would pass its cap or change dtype."""
    buckets: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    current_dtype: np.dtype | None = None
    for spec in reversed(specs):
        cap = first_cap_bytes if not buckets else cap_bytes
        if current and (spec.dtype != current_dtype or current_bytes + spec.nbytes > cap):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(spec.name)
        current_bytes += spec.nbytes
        current_dtype = spec.dtype
    if current:
        buckets.append(current)
    return buckets


def build_buckets(
    specs: Sequence[ParamSpec], groups: list[list[str]], xp: Any = np
) -> list[Bucket]:
    """Allocate one flat buffer per bucket (array module ``xp``) and its views."""
    by_name = {s.name: s for s in specs}
    out = []
    for index, names in enumerate(groups):
        dtype = by_name[names[0]].dtype
        offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name in names:
            n = by_name[name].numel
            offsets[name] = (pos, pos + n)
            pos += n
        flat = xp.zeros(pos, dtype=dtype)
        bucket = Bucket(index=index, names=list(names), dtype=dtype, flat=flat, offsets=offsets)
        for name in names:
            start, stop = offsets[name]
            bucket.views[name] = flat[start:stop].reshape(by_name[name].shape)
        out.append(bucket)
    return out
