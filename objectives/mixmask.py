"""MixMask's lambda-weighted asymmetric loss on a siamese base (Vishniakov, Xing and Shen, arXiv 2210.11456)."""

from __future__ import annotations

from typing import Any

import torch

from masklab.pipeline import Batch

from .backbones import CNNBackbone, ViTBackbone
from .registry import register_objective
from .siamese import BASES, PairLoss, Siamese, SiameseOptions, small_siamese_options

__all__ = ["MixMaskSiamese", "mixmask_loss", "mixmask_terms"]


def mixmask_terms(
    base: PairLoss, q_mix: torch.Tensor, k: torch.Tensor, lam: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """MixMask's mixed terms per image: ``lam_i base(q_mix[i], k_i) + (1 - lam[inv[i]]) base(q_mix[inv[i]], k_i)``.

    ``x_mix[j] = M_j * x_q[j] + (1 - M_j) * x_q[partner[j]]`` holds ``lam_j``
    of image ``j`` and ``1 - lam_j`` of ``partner[j]``; image ``i`` is the
    partner of ``inv[i]``. So each mixed embedding is pulled toward the keys
    of both its sources, weighted by their area shares.

    Args:
        base: per-sample base loss ``base(q, k) -> (B,)``.
        q_mix: embeddings of the mixed views.
        k: keys of the clean key views.
        lam: own-area fraction of each mixed view.
        inverse: the inverse of the partner permutation (``inverse[partner[j]] == j``).

    Returns:
        ``(B,)`` mixed loss per image.

    Shape:
        ``q_mix``, ``k``: ``(B, D)``; ``lam``, ``inverse``: ``(B,)``.
    """
    n = q_mix.shape[0]
    if k.shape != q_mix.shape or lam.shape != (n,) or inverse.shape != (n,):
        raise ValueError(
            f"need q_mix and k (B, D) and lam, inverse (B,); got q_mix {tuple(q_mix.shape)}, k {tuple(k.shape)}, "
            f"lam {tuple(lam.shape)}, inverse {tuple(inverse.shape)}"
        )
    lam = lam.to(q_mix.dtype)
    own = lam * base(q_mix, k)
    filled = (1 - lam[inverse]) * base(q_mix[inverse], k)
    return own + filled


def mixmask_loss(
    base: PairLoss,
    q: torch.Tensor,
    q_mix: torch.Tensor,
    k: torch.Tensor,
    lam: torch.Tensor,
    inverse: torch.Tensor,
) -> torch.Tensor:
    """MixMask's loss, averaged over images: ``base(q_i, k_i)`` plus :func:`mixmask_terms`.

    With one ``lam`` for the batch and the reversed batch as partner this is
    the authors' form; ``lam`` may differ per sample and the partner may be any
    permutation.

    Args:
        base: per-sample base loss ``base(q, k) -> (B,)`` (e.g. ``partial(infonce_loss, queue=..., reduction="none")``).
        q: embeddings of the clean query views.
        q_mix: embeddings of the mixed query views.
        k: keys of the clean key views.
        lam: own-area fraction of each mixed view.
        inverse: the inverse of the partner permutation.

    Returns:
        A scalar.

    Shape:
        ``q``, ``q_mix``, ``k``: ``(B, D)``; ``lam``, ``inverse``: ``(B,)``.

    Examples:
        >>> import torch
        >>> from masklab.objectives import negative_cosine
        >>> from functools import partial
        >>> q = k = torch.eye(2)
        >>> lam, inverse = torch.tensor([1.0, 1.0]), torch.tensor([1, 0])
        >>> mixmask_loss(partial(negative_cosine, reduction="none"), q, q, k, lam, inverse).item()
        -2.0
    """
    if q.shape != q_mix.shape:
        raise ValueError(f"q {tuple(q.shape)} and q_mix {tuple(q_mix.shape)} differ")
    return (base(q, k) + mixmask_terms(base, q_mix, k, lam, inverse)).mean()


class MixMaskSiamese(Siamese):
    """MixMask (Vishniakov, Xing and Shen, "MixMask: Revisiting Masking Strategy for Siamese ConvNets", 2023) on a siamese base.

    Reads ``batch.views[0]`` (query), ``batch.views[1]`` (key) and the
    :class:`~masklab.transforms.MixMask` stage's ``batch.mix`` (the query view
    mixed with its partner's, ``lam``, ``inverse``): put ``Views(2, ...)``,
    ``Normalize`` and ``MixMask(view=0)`` in the loader, in that order. The loss
    per image is the base's plus :func:`mixmask_terms`; the mixed view goes
    through the online network only, the keys stay clean. On the symmetric
    bases (BYOL, SimSiam) the plain term is the base's symmetric loss, the
    mean of its two directions (:class:`Siamese`), and the mixed terms are not
    swapped (our choice: only the query view is mixed, as in the paper); so
    the mixed terms weigh as much as the plain loss, as on MoCo.

    Args:
        backbone: a :class:`ViTBackbone` or :class:`CNNBackbone`.
        base: ``"moco"`` (the paper's), ``"byol"`` or ``"simsiam"``.
        **kwargs: the base's options (see :class:`Siamese`).

    Examples:
        >>> import torch
        >>> from masklab.objectives import build_backbone
        >>> from masklab.transforms import MixMask
        >>> _ = torch.manual_seed(0)
        >>> model = MixMaskSiamese(build_backbone("resnet18"), "moco", hidden=32, dim=16, queue_size=64)
        >>> views = [torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)]
        >>> batch = MixMask(grid=4, view=0)(Batch(images=views[0], views=views, seed=0))
        >>> sorted(model(batch).logs)
        ['loss', 'mixed', 'plain']
    """

    prefix = "mixmask_"

    def __init__(self, backbone: ViTBackbone | CNNBackbone, base: str = "moco", **kwargs: Any) -> None:
        super().__init__(backbone, base, **kwargs)

    def extra_terms(self, batch: Batch, base: PairLoss, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        mix = batch.mix
        if mix is None or "images" not in mix:
            raise ValueError("MixMaskSiamese needs batch.mix: add MixMask(view=0) after Views and Normalize")
        q_mix, _ = self.online(mix["images"])
        return mixmask_terms(base, q_mix, k, mix["lam"], mix["inverse"])


for _base in BASES:
    register_objective(
        f"{MixMaskSiamese.prefix}{_base}", options=SiameseOptions, takes="mix", views=2, small=small_siamese_options
    )(MixMaskSiamese)
