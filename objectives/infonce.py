"""MoCo's InfoNCE loss against a queue of negative keys, and the queue."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import concat_all_gather

__all__ = ["KeyQueue", "infonce_loss"]


def infonce_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2, reduction: str = "mean"
) -> torch.Tensor:
    """InfoNCE with one positive key per query and the queue as negatives (He et al., MoCo, 2020).

    ``q`` and ``k`` are L2-normalised here; ``queue`` holds normalised keys.
    Per sample: ``-log(exp(q.k / T) / (exp(q.k / T) + sum_n exp(q.n / T)))``.

    Args:
        q: queries.
        k: their positive keys (no gradient is taken through them).
        queue: negative keys.
        temperature: ``T`` (0.2 in MoCo v2).
        reduction: ``"mean"`` or ``"none"`` (one loss per sample).

    Returns:
        A scalar, or ``(B,)`` with ``reduction="none"``.

    Shape:
        ``q``, ``k``: ``(B, D)``; ``queue``: ``(K, D)``.
    """
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be (B, D)")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue {tuple(queue.shape)} must be (K, {q.shape[1]})")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    negative = q @ queue.to(q.dtype).t()  # (B, K)
    logits = torch.cat([positive, negative], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target, reduction=reduction)


class KeyQueue(nn.Module):
    """A first-in first-out queue of ``size`` L2-normalised keys (MoCo's dictionary).

    The keys and the write pointer are buffers, so the queue is in every
    checkpoint. :meth:`push` gathers the keys of every rank first (in rank
    order), so all ranks hold the same queue; the pointer moves on the device
    (no host sync), and the size need not be a multiple of the batch.

    Args:
        size: ``K``, the number of negative keys (65536 in MoCo).
        dim: ``D``, the key features.

    Examples:
        >>> import torch
        >>> queue = KeyQueue(4, 2)
        >>> queue.push(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]))
        >>> queue.push(torch.tensor([[0.0, -1.0], [-1.0, 0.0]]))
        >>> queue.keys.tolist(), int(queue.ptr)
        ([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]], 1)
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        if dim < 1:
            raise ValueError(f"key dim must be positive, got {dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Gather ``(B, D)`` keys from every rank, normalise them and overwrite the oldest entries."""
        keys = F.normalize(concat_all_gather(keys.detach()), dim=1)
        count = keys.shape[0]
        kept = keys[-self.size :]  # more keys than the queue holds: the older ones would be overwritten anyway
        start = self.ptr + (count - kept.shape[0])
        rows = (start + torch.arange(kept.shape[0], device=keys.device)) % self.size
        self.keys.index_copy_(0, rows, kept.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + count) % self.size)
