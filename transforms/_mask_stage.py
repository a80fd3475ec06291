"""The shell shared by patch-mask stages: hyper-parameters, the grid, ``erase``."""

from __future__ import annotations

import torch

from masklab.pipeline import Batch, Stage

from ._sampling import patch_grid
from .patch_mask import VISIBLE, PatchMask

__all__ = ["PatchMaskStage", "erase_patches"]


def erase_patches(images: torch.Tensor, mask: PatchMask, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Replace the pixels of every non-VISIBLE cell of ``mask`` by ``fill``.

    Patch erasing for supervised training: a regulariser in the family of
    Cutout and random erasing, with masklab's mask generators.

    Args:
        images: ``(B, C, H, W)``.
        mask: a :class:`PatchMask` whose grid divides ``H x W``.
        fill: a value, or a tensor broadcastable to ``images`` (e.g. per-channel means).

    Returns:
        A new ``(B, C, H, W)`` tensor.
    """
    hidden = (mask.to_pixels(*images.shape[-2:]) != VISIBLE).unsqueeze(1)
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    return torch.where(hidden, fill, images)


class PatchMaskStage(Stage):
    """Base of the stages that put a :class:`PatchMask` in ``batch.mask``.

    Subclasses implement :meth:`sample` (the functional draw on a grid).
    """

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.patch_size = int(patch_size)

    def grid_for(self, images: torch.Tensor) -> tuple[int, int]:
        """``(Gh, Gw)`` for ``images``; raises if the size is not divisible by the patch."""
        return patch_grid(images.shape[-2], images.shape[-1], self.patch_size)

    def sample(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator | None, device: torch.device
    ) -> PatchMask:
        raise NotImplementedError

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> PatchMask:
        return self.sample(len(batch), tuple(batch.images.shape[-2:]), generator, batch.device)

    def apply(self, batch: Batch, params: PatchMask) -> Batch:
        return batch.replace(mask=params)

    def erase(
        self, images: torch.Tensor, fill: float | torch.Tensor = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw a mask for ``images`` (``(B, C, H, W)``) and erase its hidden patches (supervised reuse)."""
        mask = self.sample(images.shape[0], tuple(images.shape[-2:]), generator, images.device)
        return erase_patches(images, mask, fill)
