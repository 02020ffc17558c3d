"""Synchronous data parallelism: gradient buckets averaged by overlapped all-reduces."""

from __future__ import annotations

from ._ddp import DistributedDataParallel
from ._hooks import CommHook, allreduce_hook, fp16_compress_hook

__all__ = ["CommHook", "DistributedDataParallel", "allreduce_hook", "fp16_compress_hook"]
