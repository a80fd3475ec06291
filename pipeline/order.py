"""Epoch orders: shuffled, sharded across ranks, resumable mid-epoch."""

from __future__ import annotations

import numpy as np
from torch.utils.data import DistributedSampler

from .stage import derive_seed

__all__ = ["epoch_order"]


def epoch_order(
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> np.ndarray:
    """The dataset indices rank ``rank`` reads in ``epoch``.

    The permutation depends only on ``(seed, epoch)``, so every rank computes
    the same one and takes its own slice: PyTorch's ``DistributedSampler``
    (seeded with ``derive_seed(seed, epoch)`` at its epoch 0) pads to a
    multiple of ``world_size`` by repeating the head of the order, then rank
    ``r`` takes positions ``r, r + W, ...``.
    Ranks are disjoint except for at most ``world_size - 1`` padding repeats.

    Args:
        num_samples: dataset size.
        seed: the run's seed.
        epoch: the epoch number.
        shuffle: ``False`` keeps the dataset order (before sharding).
        rank: this process's rank.
        world_size: number of processes.

    Returns:
        ``(ceil(num_samples / world_size),)`` int64 indices.

    Examples:
        >>> epoch_order(5, seed=0, epoch=0, shuffle=False, rank=1, world_size=2).tolist()
        [1, 3, 0]
    """
    num_samples = int(num_samples)
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    sampler = DistributedSampler(
        range(num_samples), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=derive_seed(seed, epoch)
    )
    return np.fromiter(sampler, dtype=np.int64, count=len(sampler))
