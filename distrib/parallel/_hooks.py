"""Communication hooks: what a bucket sends and how the result comes back.

A hook turns a bucket's flat gradients into the buffer that is all-reduced
(``compress``) and writes the reduced result back as an average
(``decompress``). Both run on the caller's thread; the all-reduce between them
runs on the process group's progress thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._xp import xp_of

__all__ = ["AllreduceHook", "CommHook", "Fp16CompressHook", "allreduce_hook", "fp16_compress_hook"]


class CommHook:
    """Interface: ``compress`` returns the buffer to reduce across ranks with ``reduce_op``."""

    name = "custom"

    def reduce_op(self, comm_buf: Any) -> str:
        """``"sum"`` (compress pre-divided by the world size) or ``"avg"``."""
        return "sum"

    def compress(self, flat: Any, world_size: int, bucket: Any) -> Any:
        raise NotImplementedError

    def decompress(self, comm_buf: Any, flat: Any, world_size: int) -> None:
        raise NotImplementedError


class AllreduceHook(CommHook):
    """Average the gradients in their own dtype (``ReduceOp.AVG``).

    float32/float64 buckets are summed and divided once by the group, on its
    progress thread (off the training thread); float16 buckets are divided
    first, as torch does, so that the sum stays in range.
    """

    name = "allreduce"

    def compress(self, flat: Any, world_size: int, bucket: Any) -> Any:
        if world_size > 1 and flat.dtype == np.float16:
            flat *= 1.0 / world_size
        return flat

    def reduce_op(self, flat: Any) -> str:
        return "sum" if flat.dtype == np.float16 else "avg"

    def decompress(self, comm_buf: Any, flat: Any, world_size: int) -> None:
        pass  # reduced in place


class Fp16CompressHook(CommHook):
    """Communicate in float16 (half the bytes), keep and accumulate gradients in float32.

    Like torch's ``fp16_compress_hook``: gradients are divided by the world size,
    cast to float16 into a buffer reused across steps, summed, and cast back.
    Buckets that are already float16 (or not floating) are sent as they are.
    """

    name = "fp16"

    def compress(self, flat: Any, world_size: int, bucket: Any) -> Any:
        if flat.dtype == np.float16 or not np.issubdtype(flat.dtype, np.floating):
            return AllreduceHook.compress(self, flat, world_size, bucket)  # type: ignore[arg-type]
        if bucket.comm_buf is None or bucket.comm_buf.shape != flat.shape:
            xp = xp_of(flat)
            bucket.comm_buf = xp.empty(flat.shape, dtype=np.float16)
        buf = bucket.comm_buf
        if world_size > 1:
            np.multiply(flat, 1.0 / world_size, out=buf, casting="same_kind")
        else:
            buf[...] = flat
        return buf

    def decompress(self, comm_buf: Any, flat: Any, world_size: int) -> None:
        if comm_buf is not flat:
            flat[...] = comm_buf


allreduce_hook = AllreduceHook()
fp16_compress_hook = Fp16CompressHook()
