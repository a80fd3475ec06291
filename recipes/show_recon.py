"""Pictures of what a masked-image-modelling checkpoint reconstructs: input, masked input, reconstruction."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from masklab.pipeline import Batch
from masklab.transforms import VISIBLE, Normalize, PatchMask

from .build import family_of, mask_stages
from .show_masks import draw_mask_picture, load_images, overlay

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["reconstruction_rows", "show_recon"]


def _denormalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * std + mean


def reconstruction_rows(
    cfg: TrainConfig, model: nn.Module, images: torch.Tensor, seed: int = 0
) -> list[tuple[str, torch.Tensor]]:
    """The picture's rows for ``images`` in ``[0, 1]``: the input, the masked input, the reconstruction,
    and the reconstruction with the visible patches pasted back.

    The mask comes from the checkpoint's own mask stage (``cfg.mask``), drawn with ``seed``; a
    guided stage (AMT) has no saliency cache here and masks as before its first refresh.
    """
    if not hasattr(model, "reconstruct"):
        raise ValueError(
            f"show-recon draws masked-image-modelling reconstructions: the checkpoint holds a "
            f"{type(model).__name__} (objective {cfg.objective.name!r}); give a mae or simmim checkpoint"
        )
    stages = mask_stages(cfg, family_of(model), num_samples=len(images))
    batch = Normalize(cfg.data.mean, cfg.data.std)(Batch(images=images, seed=seed, index=torch.arange(len(images))))
    for stage in stages:
        batch = stage(batch)
    mask = batch.mask
    if not isinstance(mask, PatchMask):
        raise ValueError(f"mask {cfg.mask.name!r} gives no patch mask to reconstruct from")
    recon = _denormalise(model.reconstruct(batch.images, mask), cfg.data.mean, cfg.data.std)
    pixels = mask.to_pixels(*images.shape[-2:])
    visible = (pixels == VISIBLE).unsqueeze(1)
    label = f"masked {mask.num_masked}" + (f", thrown {mask.num_thrown}" if mask.num_thrown else "")
    return [
        ("image", images),
        (label, overlay(images, pixels)),
        ("reconstruction", recon),
        ("+ visible", torch.where(visible, images, recon)),
    ]


def show_recon(
    checkpoint: str | os.PathLike,
    out: Path,
    data: str | None = None,
    n: int = 8,
    seed: int = 0,
    trust_checkpoint: bool = False,
) -> Path:
    """Draw a MAE or SimMIM checkpoint's reconstructions of ``n`` images (the first of ``data``, a
    ``.beton``, else of the built-in shapes) at the resolution it was trained at, and save to ``out``.

    Raises:
        ValueError: ``n`` below 1, or a checkpoint whose objective does not reconstruct pixels.
    """
    from .trained import load_trained

    if n < 1:
        raise ValueError(f"-n (images to draw) must be at least 1, got {n}")
    cfg, model = load_trained(checkpoint, trust=trust_checkpoint)
    images = load_images(n, cfg.data.resolution, data, seed)
    rows = reconstruction_rows(cfg, model, images, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_mask_picture(rows, out, f"{cfg.objective.name} reconstructions, {Path(checkpoint).name}")
    return out
