"""HPM: MAE that also learns to predict which patches are hard to reconstruct.

Wang, Song, Fan, Wang, Xie and Zhang, "Hard Patches Mining for Masked Image
Modeling", CVPR 2023. The objective here is the model side; the mask side is
:class:`~masklab.transforms.HardPatchMask`, which reads this objective's
``difficulty`` guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from masklab.pipeline import Batch
from masklab.transforms import MaskOptions, PatchMask
from masklab.transforms.protocols import Guide

from ._common import GuidanceMixin, ObjectiveOutput, gather_tokens, patchify
from .backbones import ViTBackbone
from .mae import MAE, MAEOptions, _init_decoder, decoder_blocks, mae_patch_losses
from .registry import register_objective

__all__ = ["HPM", "HPMOptions", "pairwise_order_loss"]


def pairwise_order_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """HPM's relative loss: learn which of two patches has the higher loss, not the loss itself.

    For every ordered pair ``(i, j)`` of patches of a sample whose true losses
    differ, a binary cross-entropy on the logit ``predicted[j] - predicted[i]``
    with label ``target[j] > target[i]``; the mean over all such pairs of the
    batch (pairs with equal true losses are left out; none at all gives 0).
    Each unordered pair counts twice with the same term, so this is also the
    mean over unordered pairs. The authors' code takes ``log(sigmoid + 1e-6)``;
    we use the exact, stable ``binary_cross_entropy_with_logits``.

    Args:
        predicted: ``(B, n)`` predicted losses (any scale: only differences matter).
        target: ``(B, n)`` true losses; pass them detached.

    Examples:
        >>> import torch
        >>> pairwise_order_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 5.0]]))  # softplus(-2)
        tensor(0.1269)
        >>> pairwise_order_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 5.0]]))  # wrong order: softplus(2)
        tensor(2.1269)
    """
    if predicted.shape != target.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} must both be (B, n)")
    predicted = predicted.float()
    logits = predicted.unsqueeze(1) - predicted.unsqueeze(2)  # [b, i, j] = predicted[j] - predicted[i]
    above = target.unsqueeze(1) > target.unsqueeze(2)
    ordered = above | (target.unsqueeze(1) < target.unsqueeze(2))
    terms = F.binary_cross_entropy_with_logits(logits, above.float(), reduction="none")
    return (terms * ordered).sum() / ordered.sum().clamp(min=1)


@dataclass
class HPMOptions(MAEOptions):
    """``objective.name: hpm``: MAE's options, the loss predictor's depth and its loss's weight."""

    predictor_depth: int = 2
    predictor_weight: float = 1.0


@register_objective(
    "hpm", options=HPMOptions, takes="patch", families=("vit",), small=lambda: HPMOptions(teacher_decay=0.99)
)
class HPM(MAE):
    """Hard Patches Mining (Wang et al., CVPR 2023): :class:`MAE` plus a loss predictor.

    The loss predictor is a second decoder beside MAE's: transformer blocks
    on the same decoder input (the encoded VISIBLE patches and a mask token at
    each MASKED cell, with positions), then a linear map to one score per
    patch. It is trained with :func:`pairwise_order_loss` on the MASKED
    patches: the order of its scores should follow the order of the real
    per-patch reconstruction losses (:func:`~masklab.objectives.mae.mae_patch_losses`,
    detached). The loss is ``reconstruction + predictor_weight * order``
    (the paper adds the two, weight 1). The predictor's gradient reaches the
    encoder too, as in the paper, where learning to predict the loss alone
    already helps the representation.

    ``guidance("difficulty")`` gives a stage (:class:`~masklab.transforms.HardPatchMask`)
    each patch's predicted loss for whole images: the encoder on every patch,
    the predictor on all of them, no grad, eval mode, as the authors' code
    reads it (the predictor is trained on mask tokens and read on visible
    patches there too). The guide reads the online model, i.e. the weights
    of the previous update, since the loader's stages run before the step.

    Our choices beyond the paper: the authors' code reads the guide from an
    EMA copy of the whole model (decay 0.999 rising to 0.9999 over the first
    100 of 800 epochs); we read the online model as of the previous update,
    which needs no second copy of the encoder and decoders (a teacher-read
    guide would be a second kind of guidance, not built). Their predictor is
    as deep and as wide as their decoder (8 blocks of 512) and ends in a
    linear map to ``p * p * 3`` values averaged per patch; ours is as wide
    as the decoder, has its own depth (``predictor_depth``, default 2, the
    default decoder's) and ends in a linear map to one value, the same family
    of functions.

    Args:
        backbone: a :class:`ViTBackbone`.
        *args, **kwargs: :class:`MAE`'s arguments: the decoder's width and heads (the predictor's too),
            its depth, ``norm_pix``, the teacher, ``fixed_pos_embed``.
        predictor_depth: loss-predictor blocks.
        predictor_weight: weight of :func:`pairwise_order_loss` in the loss.

    Examples:
        >>> import torch
        >>> from masklab.objectives import build_backbone
        >>> from masklab.pipeline import Batch
        >>> from masklab.transforms import random_patch_mask
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
        >>> hpm = HPM(vit, decoder_dim=32, decoder_depth=1, predictor_depth=1)
        >>> images = torch.rand(2, 3, 32, 32)
        >>> out = hpm(Batch(images=images, mask=random_patch_mask(2, (4, 4), 0.75)))
        >>> sorted(out.logs), bool(out.loss > out.logs["reconstruction"])
        (['loss', 'masked', 'order', 'reconstruction'], True)
        >>> tuple(hpm.guidance("difficulty")(images, (4, 4)).shape)
        (2, 4, 4)
    """

    name = "hpm"
    guides = (*GuidanceMixin.guides, "difficulty")

    def __init__(
        self,
        backbone: ViTBackbone,
        *args: Any,
        predictor_depth: int = 2,
        predictor_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, *args, **kwargs)
        if predictor_depth < 1:
            raise ValueError(f"predictor_depth must be at least 1, got {predictor_depth}")
        if not predictor_weight > 0:
            raise ValueError(f"predictor_weight must be positive, got {predictor_weight}")
        self.predictor_weight = float(predictor_weight)
        width, heads = self.decoder_embed.out_features, self.decoder[0].attn.num_heads
        self.loss_predictor = nn.Sequential(
            *decoder_blocks(width, heads, predictor_depth), nn.LayerNorm(width, eps=1e-6), nn.Linear(width, 1)
        )
        self.loss_predictor.apply(_init_decoder)

    @classmethod
    def from_options(cls, backbone: ViTBackbone, options: HPMOptions, mask: MaskOptions, **extra: Any) -> HPM:
        return super().from_options(
            backbone,
            options,
            mask,
            predictor_depth=options.predictor_depth,
            predictor_weight=options.predictor_weight,
            **extra,
        )

    def forward(self, batch: Batch) -> ObjectiveOutput:
        mask = self.patch_mask(batch)
        tokens = self.decoder_tokens(batch.images, mask)
        target = gather_tokens(patchify(batch.images, self.backbone.patch_size), mask.ids_masked)
        losses = mae_patch_losses(self.reconstruct_tokens(tokens, mask), target, self.norm_pix)  # (B, n_masked)
        predicted = self.loss_predictor(tokens)[:, self.backbone.num_prefix + mask.num_visible :, 0]
        reconstruction = losses.mean()
        order = pairwise_order_loss(predicted, losses.detach())
        loss = reconstruction + self.predictor_weight * order
        logs = {"loss": loss.detach(), "reconstruction": reconstruction.detach(), "order": order.detach()}
        return ObjectiveOutput(loss, {**logs, "masked": torch.tensor(float(mask.num_masked))})

    @torch.no_grad()
    def difficulty(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Each patch's predicted loss for whole ``(B, C, H, W)`` images: ``(B, Gh, Gw)``, higher is harder.

        Raises:
            ValueError: ``grid`` is not the model's patch grid for these images.
        """
        gh, gw = self.backbone.grid(images)
        if grid is not None and tuple(grid) != (gh, gw):
            raise ValueError(
                f"difficulty is predicted per patch of the model: grid {tuple(grid)} is not the {gh}x{gw} grid of "
                f"patch_size={self.backbone.patch_size}; give the mask stage the model's patch size"
            )
        every_patch = PatchMask.all_visible(images.shape[0], (gh, gw), images.device)
        # All VISIBLE: ids_keep is the cells in order, so the scores come out in grid order.
        scores = self.loss_predictor(self.decoder_tokens(images, every_patch))[:, self.backbone.num_prefix :, 0]
        return scores.float().view(-1, gh, gw)

    def guidance(self, kind: str) -> Guide:
        """``difficulty``: :meth:`difficulty` in eval mode (restoring the mode after); else :class:`MAE`'s."""
        if kind != "difficulty":
            return super().guidance(kind)

        def guide(images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
            was_training = self.training
            self.eval()
            try:
                return self.difficulty(images, grid)
            finally:
                self.train(was_training)

        return guide
