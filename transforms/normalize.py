"""Per-channel normalisation stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from masklab.pipeline import Batch, Stage

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "normalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel; ``images`` is ``(B, C, H, W)``."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


class Normalize(Stage):
    """Normalise ``batch.images`` (and any views) per channel.

    Args:
        mean: per-channel mean (ImageNet's by default).
        std: per-channel standard deviation, all positive.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = Normalize(mean=(0.5,) * 3, std=(0.5,) * 3)(Batch(images=torch.ones(1, 3, 2, 2)))
        >>> out.images.unique().tolist()
        [1.0]
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def forward(self, batch: Batch) -> Batch:
        if batch.images.shape[1] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channels but images are {tuple(batch.images.shape)}")
        views = None if batch.views is None else [normalize(v, self.mean, self.std) for v in batch.views]
        return batch.replace(images=normalize(batch.images, self.mean, self.std), views=views)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"
