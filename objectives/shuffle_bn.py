"""Shuffle-BN in one process: run a network on shuffled chunks of the batch, then restore the order."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["shuffle_bn"]


def shuffle_bn(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, order: torch.Tensor, splits: int
) -> torch.Tensor:
    """``fn`` on ``splits`` chunks of ``x[order]``, its outputs put back in ``x``'s order.

    MoCo (He et al., 2020) shuffles the key batch across GPUs before the
    momentum encoder, so a key's batch-norm statistics come from a random
    sub-batch, not from the sub-batch its query was normalised with (the
    leak that lets the model "cheat" the pretext task); the authors' 1-GPU
    demo emulates the GPUs with a ``SplitBatchNorm``. Here the chunks are
    separate calls of ``fn``, so every batch-norm layer in it, whatever its
    kind, sees one chunk in training mode. In eval mode the result equals
    ``fn(x)`` up to floating-point error.

    Args:
        fn: the network, ``(n, ...) -> (n, ...)``, e.g. the momentum encoder.
        x: the batch.
        order: a permutation of ``range(B)``, drawn by the caller (on ``x``'s device).
        splits: chunks; ``B`` need not be a multiple (``torch.tensor_split``'s sizes),
            but every chunk needs two samples, as batch norm does in training mode.

    Returns:
        ``fn``'s outputs, row ``i`` for ``x[i]``.

    Shape:
        ``x``: ``(B, ...)``; ``order``: ``(B,)``.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> centre = lambda chunk: chunk - chunk.mean()  # a batch statistic, like batch norm's
        >>> shuffle_bn(centre, x, torch.tensor([0, 2, 1, 3]), splits=2).flatten().tolist()  # chunks {0, 2}, {1, 3}
        [-1.0, -1.0, 1.0, 1.0]
        >>> centre(x).flatten().tolist()
        [-1.5, -0.5, 0.5, 1.5]
    """
    n = x.shape[0]
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    if order.shape != (n,):
        raise ValueError(f"order must be a permutation of the batch, shape ({n},); got {tuple(order.shape)}")
    if splits == 1:
        return fn(x)
    if n < 2 * splits:
        raise ValueError(f"{splits} batch-norm splits need a batch of at least {2 * splits} (2 per chunk), got {n}")
    out = torch.cat([fn(chunk) for chunk in x[order].tensor_split(splits)])
    return out[torch.argsort(order)]  # out[j] belongs to x[order[j]]
