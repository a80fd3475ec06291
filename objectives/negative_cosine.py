"""BYOL's and SimSiam's loss: negative cosine similarity between a prediction and a stopped target.

One convention for every negative-cosine loss in masklab (:class:`Siamese` on
BYOL and SimSiam, :class:`MixMaskSiamese` on them, :class:`MaskDeep`): one
direction is ``-cos(p, stopgrad(z))`` averaged over samples, and a symmetric
loss is the **mean** of its two directions, so it lies in ``[-1, 1]``. That is
SimSiam's scale (Chen & He, 2021: ``L = D(p1, z2) / 2 + D(p2, z1) / 2`` with
``D = -cos``). BYOL (Grill et al., 2020) writes ``2 - 2 cos`` per direction
and sums the two directions: ``L_BYOL = 4 + 4 L_ours``, the same gradients
times 4; the learning rate absorbs the factor (with SGD, 4x our lr and a
quarter of the weight decay give BYOL's steps; LARS and Adam-style optimizers
are nearly insensitive to it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["negative_cosine"]


def negative_cosine(p: torch.Tensor, z: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``-cos(p, stopgrad(z))``: SimSiam's ``D``, one direction (BYOL's ``2 - 2 cos`` is ``2 + 2 * negative_cosine``).

    Symmetric objectives average two of these (see the module's docstring).

    Args:
        p: predictions.
        z: targets; no gradient is taken through them.
        reduction: ``"mean"`` or ``"none"`` (one loss per sample).

    Returns:
        A scalar in ``[-1, 1]``, or ``(B,)`` with ``reduction="none"``.

    Shape:
        ``p``, ``z``: ``(B, D)``.

    Examples:
        >>> import torch
        >>> negative_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]]), "none")
        tensor([-1.0000, -0.7071])
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"p {tuple(p.shape)} and z {tuple(z.shape)} must both be (B, D)")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    loss = -F.cosine_similarity(p, z.detach(), dim=1)
    return loss.mean() if reduction == "mean" else loss
