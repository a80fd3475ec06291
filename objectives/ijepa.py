"""I-JEPA: predict the EMA target encoder's features of the target blocks from the context block.

Assran, Duval, Misra, Bojanowski, Vincent, Rabbat, LeCun and Ballas, "Self-Supervised Learning from Images
with a Joint-Embedding Predictive Architecture", CVPR 2023. The mask side is
:class:`~masklab.transforms.MultiBlockMask` (VISIBLE: the context, MASKED: the targets, THROWN: the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from masklab.pipeline import Batch
from masklab.transforms import MaskOptions, PatchMask

from ._common import GuidanceMixin, ObjectiveOutput, gather_tokens
from .backbones import ViTBackbone
from .compat import check_family
from .mae import _init_decoder, check_decoder_size, decoder_blocks, positioned_tokens
from .registry import ObjectiveOptions, register_objective

__all__ = ["IJEPA", "IJEPAOptions", "ijepa_loss"]


def ijepa_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (Huber, beta 1) between predicted and target features, averaged over every feature of every
    target token; ``target`` is the target encoder's output normalised over its features (no affine).

    Examples:
        >>> import torch
        >>> ijepa_loss(torch.tensor([[[0.5, 3.0]]]), torch.tensor([[[0.0, 0.0]]]))  # (0.5 * 0.25 + 2.5) / 2
        tensor(1.3125)
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ")
    return F.smooth_l1_loss(predicted.float(), target.float())


@dataclass
class IJEPAOptions(ObjectiveOptions):
    """``objective.name: ijepa``: the predictor's width and depth, the target encoder's EMA decay at the start
    and at the end (cosine)."""

    predictor_dim: int = 128
    predictor_depth: int = 2
    teacher_decay: float = 0.996
    teacher_final_decay: float = 1.0


@register_objective("ijepa", options=IJEPAOptions, takes="patch", families=("vit",), small=lambda: IJEPAOptions())
class IJEPA(GuidanceMixin, nn.Module):
    """I-JEPA (Assran et al., CVPR 2023) on a :class:`ViTBackbone`.

    The context encoder (the backbone, the one evaluated and exported) sees the VISIBLE patches only. The
    target encoder, an EMA copy of it (decay 0.996 rising to 1.0 on a cosine, the paper's schedule; stepped by
    the training loop through :meth:`teachers`), sees the whole image; its patch features, normalised over
    the feature dimension without affine parameters, are the targets at the MASKED cells. The predictor, a
    narrow transformer, takes the context encoding mapped to its width plus the fixed sine-cosine position of
    each context cell, and a shared mask token plus the position of each MASKED cell; its outputs at the mask
    tokens, mapped back to the encoder's width, regress the targets with :func:`ijepa_loss` (smooth L1, as
    the authors' training code; the paper writes an L2 distance). THROWN cells enter neither the context nor
    the loss, though the target encoder sees their pixels (it sees the whole image, as in the paper).

    Our choices beyond the paper: the paper runs the predictor once per target block (4 blocks), each pass
    seeing the context and that block's mask tokens only; here one pass predicts every MASKED cell, so the
    mask tokens of different blocks attend to each other (one ``PatchMask`` holds the union of the blocks,
    and their count is equal across the batch, see :class:`~masklab.transforms.MultiBlockMask`). The
    predictor's width and depth default to 128 and 2 for 32 px images and short runs (the paper's: 384, 12).
    Its linear layers start xavier-uniform and the mask token ``normal(std=0.02)``, as MAE's decoder here.

    Args:
        backbone: a :class:`ViTBackbone` (the context encoder).
        predictor_dim: predictor width (divisible by ``predictor_heads`` and by 4).
        predictor_depth: predictor blocks.
        predictor_heads: predictor attention heads.
        teacher_decay: the target encoder's EMA decay at the start of training.
        teacher_final_decay: its decay at the end.

    Examples:
        >>> import torch
        >>> from masklab.objectives import build_backbone
        >>> from masklab.pipeline import Batch
        >>> from masklab.transforms import random_patch_mask
        >>> vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
        >>> ijepa = IJEPA(vit, predictor_dim=32, predictor_depth=1)
        >>> out = ijepa(Batch(images=torch.rand(2, 3, 32, 32), mask=random_patch_mask(2, (4, 4), 0.5)))
        >>> sorted(out.logs), out.loss.requires_grad, len(ijepa.teachers())
        (['loss', 'masked'], True, 1)
    """

    name = "ijepa"

    def __init__(
        self,
        backbone: ViTBackbone,
        predictor_dim: int = 128,
        predictor_depth: int = 2,
        predictor_heads: int = 4,
        teacher_decay: float = 0.996,
        teacher_final_decay: float = 1.0,
    ) -> None:
        super().__init__()
        check_family(self.name, backbone)
        check_decoder_size("predictor", predictor_dim, predictor_heads, predictor_depth)
        self.backbone = backbone
        self.predictor_embed = nn.Linear(backbone.embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(predictor_dim))
        self.predictor = decoder_blocks(predictor_dim, predictor_heads, predictor_depth)
        self.predictor_norm = nn.LayerNorm(predictor_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(predictor_dim, backbone.embed_dim)
        for part in (self.predictor_embed, self.predictor, self.predictor_norm, self.predictor_proj):
            part.apply(_init_decoder)
        nn.init.normal_(self.mask_token, std=0.02)
        self.add_teacher(teacher_decay, teacher_final_decay)

    @classmethod
    def from_options(cls, backbone: ViTBackbone, options: IJEPAOptions, mask: MaskOptions) -> IJEPA:
        """Build from the config's sections (the registry's ``build``)."""
        return cls(
            backbone,
            options.predictor_dim,
            options.predictor_depth,
            teacher_decay=options.teacher_decay,
            teacher_final_decay=options.teacher_final_decay,
        )

    def predict(self, images: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """``(B, n_masked, D)``: the predicted target features of the MASKED cells, in ``mask.ids_masked`` order."""
        context = self.predictor_embed(self.backbone.encode_visible(images, mask))
        tokens = positioned_tokens(context, mask, self.backbone.num_prefix, self.mask_token)
        out = self.predictor_proj(self.predictor_norm(self.predictor(tokens)))
        return out[:, self.backbone.num_prefix + mask.num_visible :]

    @torch.no_grad()
    def targets(self, images: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """``(B, n_masked, D)``: the target encoder's features of the whole image, normalised over the feature
        dimension, at the MASKED cells (``mask.ids_masked`` order)."""
        encoder = self.teacher.module
        every_patch = PatchMask.all_visible(mask.batch_size, mask.grid, mask.device)
        tokens = encoder.encode_visible(images, every_patch)[:, encoder.num_prefix :]  # grid order
        return gather_tokens(F.layer_norm(tokens, tokens.shape[-1:]), mask.ids_masked)

    def forward(self, batch: Batch) -> ObjectiveOutput:
        mask = batch.mask
        if not isinstance(mask, PatchMask) or mask.num_masked == 0:
            raise ValueError(
                "IJEPA needs a PatchMask with MASKED cells (the targets) in batch.mask: add a mask stage "
                "(MultiBlockMask, as the paper, or RandomMask, BlockMask, ...)"
            )
        loss = ijepa_loss(self.predict(batch.images, mask), self.targets(batch.images, mask))
        return ObjectiveOutput(loss, {"loss": loss.detach(), "masked": torch.tensor(float(mask.num_masked))})
