"""DistributedSampler: each rank iterates its own shard of a dataset's indices.

Torch's semantics: shuffling is seeded by ``seed + epoch`` (call ``set_epoch``
each epoch, identically on every rank); without ``drop_last`` the index list is
padded by wrapping around so every rank gets the same number of samples; with
it, the tail that does not divide evenly is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

__all__ = ["DistributedSampler"]


class DistributedSampler:
    """Indices ``rank, rank + n, rank + 2n, ...`` of a (shuffled, padded) permutation.

    Args:
        dataset_len: number of samples (an int, or anything with ``len()``).
        num_replicas: world size; default: the default process group's.
        rank: this rank; default: the default process group's.
        shuffle: permute the indices each epoch.
        seed: base seed, identical on every rank.
        drop_last: drop the tail instead of padding it.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if not isinstance(dataset_len, int | np.integer):
            if hasattr(dataset_len, "__len__"):
                dataset_len = len(dataset_len)
            else:
                raise TypeError(
                    "DistributedSampler: dataset_len must be an int or have len(), "
                    f"got {type(dataset_len).__name__}"
                )
        dataset_len = int(dataset_len)
        if dataset_len < 0:
            raise ValueError(f"DistributedSampler: dataset_len={dataset_len} must be >= 0")
        if num_replicas is None or rank is None:
            from .. import comm

            if not comm.is_initialized():
                raise ValueError(
                    "DistributedSampler: pass num_replicas and rank, or call "
                    "distrib.init_process_group() first"
                )
            if num_replicas is None:
                num_replicas = comm.get_world_size()
            if rank is None:
                rank = comm.get_rank()
        if int(num_replicas) < 1:
            raise ValueError(f"DistributedSampler: num_replicas={num_replicas} must be >= 1")
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(
                f"DistributedSampler: rank={rank} is out of range [0, {num_replicas - 1}] "
                f"for num_replicas={num_replicas}"
            )
        self.dataset_len = dataset_len
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        if self.drop_last and dataset_len % self.num_replicas != 0:
            self.num_samples = math.ceil((dataset_len - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(dataset_len / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle for ``epoch``; call it on every rank before iterating."""
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch, as an int64 array."""
        n = self.dataset_len
        if self.shuffle:
            rng = np.random.default_rng(self.seed + self.epoch)
            idx = rng.permutation(n).astype(np.int64)
        else:
            idx = np.arange(n, dtype=np.int64)
        if not self.drop_last:
            pad = self.total_size - n
            if pad > 0 and n > 0:
                idx = np.concatenate([idx, np.resize(idx, pad)])
        else:
            idx = idx[: self.total_size]
        return idx[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples
