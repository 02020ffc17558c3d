"""Data-loading helpers for data-parallel training."""

from __future__ import annotations

from ._sampler import DistributedSampler

__all__ = ["DistributedSampler"]
