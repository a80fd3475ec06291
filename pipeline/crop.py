"""Random resized crop and flip on the device, with the boxes recorded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.geometry.transform import crop_and_resize

from .batch import Batch
from .stage import Stage

__all__ = ["CropParams", "random_resized_crop_params", "full_crop_params", "apply_crop", "RandomResizedCrop"]

_ATTEMPTS = 10


@dataclass(frozen=True)
class CropParams:
    """Crop boxes and flips of a batch.

    Attributes:
        boxes: ``(B, 4)`` float ``(x0, y0, x1, y1)`` in source pixels, ``x1``/``y1`` exclusive.
        flips: ``(B,)`` bool.
    """

    boxes: torch.Tensor
    flips: torch.Tensor


def _uniform(shape: tuple[int, ...], low: float, high: float, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def random_resized_crop_params(
    batch_size: int,
    source_size: tuple[int, int],
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> CropParams:
    """Draw random-resized-crop boxes for a batch, on ``device``.

    torchvision's rule, batched: per sample, ten (area, log-aspect) attempts;
    the first that fits is used, else a centre crop with the aspect clamped
    to ``ratio``. Box sides and corners are whole pixels.

    Args:
        batch_size: ``B``.
        source_size: ``(H, W)`` of the images the boxes refer to.
        scale: range of the crop's area as a fraction of the source area.
        ratio: range of the crop's aspect ratio (width / height).
        flip_p: probability of a left-right flip.
        generator: a ``torch.Generator`` on ``device`` (or ``None``).
        device: where to draw.

    Returns:
        :class:`CropParams` with ``boxes (B, 4)`` and ``flips (B,)``.
    """
    height, width = source_size
    area = float(height * width)
    shape = (batch_size, _ATTEMPTS)
    target_area = area * _uniform(shape, scale[0], scale[1], generator, device)
    log_ratio = _uniform(shape, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    # First fitting attempt per sample (argmax returns the first maximum).
    first = torch.argmax(fits.to(torch.uint8), dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    w = torch.gather(w, 1, first).squeeze(1)
    h = torch.gather(h, 1, first).squeeze(1)
    # Fallback: the whole image with the aspect clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    u = torch.rand((batch_size, 2), generator=generator, device=device)
    x0 = torch.where(any_fit, torch.floor(u[:, 0] * (width - w + 1)), torch.full_like(w, (width - fw) // 2))
    y0 = torch.where(any_fit, torch.floor(u[:, 1] * (height - h + 1)), torch.full_like(h, (height - fh) // 2))
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=1)
    flips = torch.rand((batch_size,), generator=generator, device=device) < flip_p
    return CropParams(boxes=boxes, flips=flips)


def full_crop_params(batch_size: int, source_size: tuple[int, int], device: torch.device | str = "cpu") -> CropParams:
    """Boxes covering the whole source image, no flips."""
    height, width = source_size
    box = torch.tensor([0.0, 0.0, float(width), float(height)], device=device)
    return CropParams(
        boxes=box.expand(batch_size, 4).clone(), flips=torch.zeros(batch_size, dtype=torch.bool, device=device)
    )


def apply_crop(images: torch.Tensor, params: CropParams, size: tuple[int, int]) -> torch.Tensor:
    """Crop ``images`` to ``params.boxes``, resize to ``size`` (bilinear), then flip.

    Args:
        images: ``(B, C, H, W)`` float or uint8 images (uint8 is scaled to ``[0, 1]``).
        params: boxes and flips from :func:`random_resized_crop_params`.
        size: output ``(h, w)``.

    Returns:
        ``(B, C, h, w)`` float images.
    """
    if not images.is_floating_point():
        images = images.float().div_(255.0)
    x0, y0, x1, y1 = params.boxes.to(images.dtype).unbind(1)
    # kornia's corners are pixel centres: the last pixel of [x0, x1) is x1 - 1.
    corners = torch.stack(
        [
            torch.stack([x0, y0], 1),
            torch.stack([x1 - 1, y0], 1),
            torch.stack([x1 - 1, y1 - 1], 1),
            torch.stack([x0, y1 - 1], 1),
        ],
        dim=1,
    )
    out = crop_and_resize(images, corners, size, mode="bilinear", align_corners=True)
    return torch.where(params.flips.view(-1, 1, 1, 1), out.flip(-1), out)


class RandomResizedCrop(Stage):
    """Random resized crop and flip of ``batch.images``, boxes recorded in the batch.

    The loader decodes each image once at a fixed size and runs this stage on
    the device, so the crop boxes (``batch.crops``, in source pixels) and
    flips (``batch.flips``) are known to later stages, e.g. to align a
    per-image saliency map with the crop.

    Args:
        size: output side (int) or ``(h, w)``.
        scale: area range of the crop; ``None`` resizes the whole image.
        ratio: aspect range of the crop.
        flip_p: probability of a left-right flip.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> _ = torch.manual_seed(0)
        >>> out = RandomResizedCrop(8)(Batch(images=torch.rand(2, 3, 16, 16)))
        >>> tuple(out.images.shape), tuple(out.crops.shape), out.source_size
        ((2, 3, 8, 8), (2, 4), (16, 16))
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] | None = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
    ) -> None:
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if min(self.size) < 1:
            raise ValueError(f"size must be positive, got {size}")
        if scale is not None and not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        if not 0 <= flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.scale = None if scale is None else tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> CropParams:
        source = tuple(batch.images.shape[-2:])
        if self.scale is None:
            params = full_crop_params(len(batch), source, batch.device)
            if self.flip_p > 0:
                flips = torch.rand((len(batch),), generator=generator, device=batch.device) < self.flip_p
                params = CropParams(params.boxes, flips)
            return params
        return random_resized_crop_params(
            len(batch), source, self.scale, self.ratio, self.flip_p, generator, batch.device
        )

    def apply(self, batch: Batch, params: CropParams) -> Batch:
        return batch.replace(
            images=apply_crop(batch.images, params, self.size),
            crops=params.boxes,
            flips=params.flips,
            source_size=tuple(batch.images.shape[-2:]),
        )

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p}"
