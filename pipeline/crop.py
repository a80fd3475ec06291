"""Random resized crop and flip with the boxes recorded.

The params are drawn here, batched, from an explicit generator; applying
them is :func:`apply_crop` on the device, or FFCV's decoder in the
:class:`~masklab.pipeline.Loader` (which crops while decoding, on uint8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.geometry.transform import crop_and_resize

from .batch import Batch
from .stage import Stage

__all__ = [
    "CropParams",
    "RandomResizedCrop",
    "apply_crop",
    "centre_crop_params",
    "check_crop_args",
    "compose_crops",
    "draw_crop_params",
    "random_resized_crop_params",
]

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

    def __getitem__(self, rows: slice | torch.Tensor) -> CropParams:
        return CropParams(self.boxes[rows], self.flips[rows])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropParams:
        """These boxes and flips on ``device``."""
        return CropParams(
            self.boxes.to(device, non_blocking=non_blocking), self.flips.to(device, non_blocking=non_blocking)
        )


def check_crop_args(scale: tuple[float, float] | None, ratio: tuple[float, float], flip_p: float) -> None:
    """Raise ``ValueError`` naming the value if crop arguments are out of range."""
    if scale is not None and not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {tuple(ratio)}")
    if not 0 <= flip_p <= 1:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")


def _uniform(shape: tuple[int, ...], low: float, high: float, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def _sizes(batch_size: int, source_size: tuple[int, int] | torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1)`` float heights and widths from one ``(H, W)`` or per-sample ``(B, 2)`` sizes."""
    if isinstance(source_size, torch.Tensor):
        if tuple(source_size.shape) != (batch_size, 2):
            raise ValueError(f"per-sample source sizes must be ({batch_size}, 2), got {tuple(source_size.shape)}")
        sizes = source_size.to(device=device, dtype=torch.float32)
    else:
        sizes = torch.tensor([float(source_size[0]), float(source_size[1])], device=device).expand(batch_size, 2)
    return sizes[:, :1], sizes[:, 1:]


def _flips(batch_size: int, flip_p: float, generator, device) -> torch.Tensor:
    return torch.rand((batch_size,), generator=generator, device=device) < flip_p


def random_resized_crop_params(
    batch_size: int,
    source_size: tuple[int, int] | torch.Tensor,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> CropParams:
    """Draw random-resized-crop boxes for a batch, on ``device``.

    torchvision's rule, batched: per sample, ten (area, log-aspect) attempts;
    the first that fits is used, else the whole image with its aspect clamped
    into ``ratio``, centred. Box sides and corners are whole pixels.

    Args:
        batch_size: ``B``.
        source_size: ``(H, W)`` of every source image, or per-sample ``(B, 2)`` sizes.
        scale: range of the crop's area as a fraction of the source area.
        ratio: range of the crop's aspect ratio (width / height).
        flip_p: probability of a left-right flip.
        generator: a ``torch.Generator`` on ``device`` (or ``None``).
        device: where to draw.

    Returns:
        :class:`CropParams` with ``boxes (B, 4)`` and ``flips (B,)``.
    """
    height, width = _sizes(batch_size, source_size, device)
    shape = (batch_size, _ATTEMPTS)
    target_area = height * width * _uniform(shape, scale[0], scale[1], generator, device)
    aspect = torch.exp(_uniform(shape, math.log(ratio[0]), math.log(ratio[1]), generator, device))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    # First fitting attempt per sample (argmax returns the first maximum).
    first = torch.argmax(fits.to(torch.uint8), dim=1, keepdim=True)
    any_fit = fits.any(dim=1, keepdim=True)
    w, h = torch.gather(w, 1, first), torch.gather(h, 1, first)
    # Fallback: the whole image with the aspect clamped into `ratio`, centred.
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fh = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    w, h = torch.where(any_fit, w, fw), torch.where(any_fit, h, fh)
    u = torch.rand((batch_size, 2), generator=generator, device=device)
    x0 = torch.where(any_fit, torch.floor(u[:, :1] * (width - w + 1)), torch.floor((width - w) / 2))
    y0 = torch.where(any_fit, torch.floor(u[:, 1:] * (height - h + 1)), torch.floor((height - h) / 2))
    boxes = torch.cat([x0, y0, x0 + w, y0 + h], dim=1)
    return CropParams(boxes=boxes, flips=_flips(batch_size, flip_p, generator, device))


def centre_crop_params(
    batch_size: int,
    source_size: tuple[int, int] | torch.Tensor,
    flip_p: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> CropParams:
    """The largest centred square of each source image (the whole image when square)."""
    height, width = _sizes(batch_size, source_size, device)
    side = torch.minimum(height, width)
    x0, y0 = torch.floor((width - side) / 2), torch.floor((height - side) / 2)
    boxes = torch.cat([x0, y0, x0 + side, y0 + side], dim=1)
    if flip_p > 0:
        flips = _flips(batch_size, flip_p, generator, device)
    else:
        flips = torch.zeros(batch_size, dtype=torch.bool, device=device)
    return CropParams(boxes=boxes, flips=flips)


def draw_crop_params(
    batch_size: int,
    source_size: tuple[int, int] | torch.Tensor,
    scale: tuple[float, float] | None,
    ratio: tuple[float, float],
    flip_p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> CropParams:
    """Random resized crop params, or centred squares when ``scale`` is ``None``."""
    if scale is None:
        return centre_crop_params(batch_size, source_size, flip_p, generator, device)
    return random_resized_crop_params(batch_size, source_size, scale, ratio, flip_p, generator, device)


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
    """Random resized crop and flip of ``batch.images`` on the device, boxes recorded.

    The crop boxes (``batch.crops``, in source pixels), flips (``batch.flips``)
    and source sizes (``batch.source_sizes``) are kept so later stages can
    align per-image maps (AMT's saliency) with the crop.

    Args:
        size: output side (int) or ``(h, w)``.
        scale: area range of the crop; ``None`` takes the centred square (evaluation).
        ratio: aspect range of the crop.
        flip_p: probability of a left-right flip.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> _ = torch.manual_seed(0)
        >>> out = RandomResizedCrop(8)(Batch(images=torch.rand(2, 3, 16, 16)))
        >>> tuple(out.images.shape), tuple(out.crops.shape), out.source_sizes.tolist()
        ((2, 3, 8, 8), (2, 4), [[16, 16], [16, 16]])
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
        check_crop_args(scale, ratio, flip_p)
        self.scale = None if scale is None else tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> CropParams:
        source = tuple(batch.images.shape[-2:])
        return draw_crop_params(len(batch), source, self.scale, self.ratio, self.flip_p, generator, batch.device)

    def apply(self, batch: Batch, params: CropParams) -> Batch:
        height, width = batch.images.shape[-2:]
        sizes = torch.tensor([height, width], device=batch.device).expand(len(batch), 2)
        return batch.replace(
            images=apply_crop(batch.images, params, self.size),
            crops=params.boxes,
            flips=params.flips,
            source_sizes=sizes,
        )

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p}"


def compose_crops(outer: CropParams, image_size: tuple[int, int], inner: CropParams) -> CropParams:
    """Express crops of already-cropped images in the coordinates of their sources.

    ``inner`` boxes are in pixels of images of ``image_size`` that were cut from
    their sources by ``outer`` (and flipped where ``outer.flips``). Returns the
    same regions as boxes of the sources, with the two flips combined.
    """
    height, width = image_size
    ox0, oy0, ox1, oy1 = outer.boxes.unbind(1)
    ix0, iy0, ix1, iy1 = inner.boxes.to(outer.boxes.dtype).unbind(1)
    sx, sy = (ox1 - ox0) / width, (oy1 - oy0) / height
    x0 = torch.where(outer.flips, ox1 - ix1 * sx, ox0 + ix0 * sx)
    x1 = torch.where(outer.flips, ox1 - ix0 * sx, ox0 + ix1 * sx)
    boxes = torch.stack([x0, oy0 + iy0 * sy, x1, oy0 + iy1 * sy], dim=1)
    return CropParams(boxes=boxes, flips=outer.flips ^ inner.flips)
