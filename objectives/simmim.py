"""SimMIM: predict the raw pixels of masked patches from an input with mask tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from masklab.pipeline import Batch
from masklab.transforms import MASKED, VISIBLE, MaskOptions, PatchMask

from ._common import GuidanceMixin, ObjectiveOutput, TeacherOptions, gather_tokens, patchify, unpatchify
from .backbones import CNNBackbone, ViTBackbone
from .compat import check_family
from .registry import register_objective

__all__ = ["SimMIM", "SimMIMOptions", "simmim_loss"]


def simmim_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the weighted (masked) pixels and channels.

    Args:
        pred: predictions, e.g. ``(B, C, H, W)`` pixels or ``(B, n, p * p * C)`` patches.
        target: same shape as ``pred``.
        weight: 0/1, broadcastable to ``pred`` (``(B, 1, H, W)`` or ``(B, n, 1)``).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    weight = weight.to(pred.dtype).expand_as(pred)
    return ((pred - target).abs() * weight).sum() / weight.sum().clamp(min=1)


@dataclass
class SimMIMOptions(TeacherOptions):
    """``objective.name: simmim``: an optional EMA teacher (see :class:`TeacherOptions`)."""


@register_objective("simmim", options=SimMIMOptions, takes="patch", small=lambda: SimMIMOptions(teacher_decay=0.99))
class SimMIM(GuidanceMixin, nn.Module):
    """SimMIM (Xie et al., 2022) on a ViT or a CNN backbone.

    ViT: MASKED patch embeddings become a learnable mask token, THROWN patches
    are dropped from the input, and a linear head predicts each patch's
    pixels. CNN: MASKED and THROWN pixels become a learnable colour token, and
    a 1x1 convolution on the last feature map, then a pixel shuffle, predicts
    the image. Both: :func:`simmim_loss` (L1) over MASKED pixels only.

    Args:
        backbone: a :class:`ViTBackbone` or :class:`CNNBackbone`.
        teacher_decay: keep an EMA teacher of the backbone with this starting
            decay (cosine to ``teacher_final_decay``); it guides EHM's
            affinity. ``None``: no teacher.
        teacher_final_decay: the teacher's decay at the end of training.
    """

    name = "simmim"

    def __init__(
        self,
        backbone: ViTBackbone | CNNBackbone,
        teacher_decay: float | None = None,
        teacher_final_decay: float = 1.0,
    ) -> None:
        super().__init__()
        check_family(self.name, backbone)
        self.backbone = backbone
        if isinstance(backbone, ViTBackbone):
            self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
            self.head = nn.Linear(backbone.embed_dim, backbone.patch_size**2 * 3)
        else:
            self.mask_token = nn.Parameter(torch.zeros(3))
            stride = backbone.strides[-1]
            self.head = nn.Sequential(
                nn.Conv2d(backbone.channels[-1], stride**2 * 3, kernel_size=1), nn.PixelShuffle(stride)
            )
        trunc_normal_(self.mask_token, std=0.02)
        self.add_teacher(teacher_decay, teacher_final_decay)

    @classmethod
    def from_options(cls, backbone: ViTBackbone | CNNBackbone, options: SimMIMOptions, mask: MaskOptions) -> SimMIM:
        """Build from the config's sections (the registry's ``build``)."""
        return cls(backbone, **options.teacher(mask))

    def _predict(
        self, images: torch.Tensor, mask: PatchMask
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(pred, target, weight, ids)``: ViT patches of the kept cells ``ids``, or whole CNN images (``ids`` None)."""
        if isinstance(self.backbone, ViTBackbone):
            out, ids = self.backbone.encode_with_mask_token(images, mask, self.mask_token)
            pred = self.head(out)  # (B, n_kept, p * p * 3)
            patches = patchify(images, self.backbone.patch_size)
            target = gather_tokens(patches, ids)
            weight = (mask.states.flatten(1).gather(1, ids) == MASKED).unsqueeze(-1)
            return pred, target, weight, ids
        stride = self.backbone.strides[-1]
        if images.shape[-1] % stride or images.shape[-2] % stride:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not divisible by the backbone's stride {stride}"
            )
        hidden = self.backbone.hide(images, mask, self.mask_token)
        pred = self.head(self.backbone.features(hidden)[-1])
        weight = (mask.to_pixels(*images.shape[-2:]) == MASKED).unsqueeze(1)
        if pred.shape != images.shape:
            pred = F.interpolate(pred, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return pred, images, weight, None

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """``(B, 3, H, W)`` in the images' (normalised) space: VISIBLE cells as given, MASKED cells
        predicted, THROWN cells zero (what ``masklab show-recon`` draws)."""
        pred, _, _, ids = self._predict(images, mask)
        height, width = images.shape[-2:]
        if ids is None:
            states = mask.to_pixels(height, width).unsqueeze(1)
            return torch.where(states == MASKED, pred, torch.where(states == VISIBLE, images, 0.0))
        p = self.backbone.patch_size
        patches = patchify(images, p)
        predicted = torch.zeros_like(patches).scatter(1, ids.unsqueeze(-1).expand_as(pred), pred.to(patches.dtype))
        states = mask.states.flatten(1).unsqueeze(-1)
        full = torch.where(states == MASKED, predicted, torch.where(states == VISIBLE, patches, 0.0))
        return unpatchify(full, p, mask.grid)

    def forward(self, batch: Batch) -> ObjectiveOutput:
        mask = batch.mask
        if not isinstance(mask, PatchMask):
            raise ValueError("SimMIM needs a PatchMask in batch.mask: add a mask stage (SimMIMMask, RandomMask, ...)")
        pred, target, weight, _ = self._predict(batch.images, mask)
        loss = simmim_loss(pred, target, weight)
        return ObjectiveOutput(loss, {"loss": loss.detach(), "masked": torch.tensor(float(mask.num_masked))})
