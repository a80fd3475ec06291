"""BYOL's and SimSiam's loss: negative cosine similarity between a prediction and a stopped target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["negative_cosine"]


def negative_cosine(p: torch.Tensor, z: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``-cos(p, stopgrad(z))`` (SimSiam's ``D``; BYOL's ``2 - 2 cos`` up to the constant and scale).

    Args:
        p: predictions.
        z: targets; no gradient is taken through them.
        reduction: ``"mean"`` or ``"none"`` (one loss per sample).

    Returns:
        A scalar in ``[-1, 1]``, or ``(B,)`` with ``reduction="none"``.

    Shape:
        ``p``, ``z``: ``(B, D)``.
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"p {tuple(p.shape)} and z {tuple(z.shape)} must both be (B, D)")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    loss = -F.cosine_similarity(p, z.detach(), dim=1)
    return loss.mean() if reduction == "mean" else loss
