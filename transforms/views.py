"""Augmented views of each image, drawn and applied on the batch's device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import adjust_hue
from kornia.filters import gaussian_blur2d

from masklab.pipeline import Batch, CropParams, Stage, apply_crop, check_crop_args, compose_crops, draw_crop_params

__all__ = ["PRESETS", "ViewRecipe", "ViewParams", "Views", "draw_view_params", "apply_view"]


@dataclass(frozen=True)
class ViewRecipe:
    """How one view is made: crop, flip, colour jitter, greyscale, blur, solarize."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def _ssl(jitter, blur_p=0.5, solarize_p=0.0, scale=(0.08, 1.0)) -> ViewRecipe:
    return ViewRecipe(scale=scale, jitter=jitter, jitter_p=0.8, gray_p=0.2, blur_p=blur_p, solarize_p=solarize_p)


PRESETS: dict[str, tuple[ViewRecipe, ...]] = {
    # MAE: crop and flip only.
    "mae": (ViewRecipe(scale=(0.2, 1.0)),),
    # SimCLR (Chen et al., 2020): strong jitter, blur half the time.
    "simclr": (_ssl((0.8, 0.8, 0.8, 0.2)),),
    # BYOL (Grill et al., 2020): asymmetric blur (1.0 / 0.1) and solarize (0 / 0.2).
    "byol": (_ssl((0.4, 0.4, 0.2, 0.1), blur_p=1.0), _ssl((0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2)),
    # MoCo v2 (Chen et al., 2020): crop scale from 0.2, blur half the time.
    "mocov2": (_ssl((0.4, 0.4, 0.4, 0.1), scale=(0.2, 1.0)),),
}


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view of a batch (all ``(B, ...)`` on the batch's device)."""

    crop: CropParams
    jitter: torch.Tensor  # (B, 4) brightness, contrast, saturation factors and hue shift (fraction of a turn)
    jitter_on: torch.Tensor  # (B,) bool
    gray: torch.Tensor  # (B,) bool
    blur_sigma: torch.Tensor  # (B,) float, 0 = no blur
    solarize: torch.Tensor  # (B,) bool


def draw_view_params(
    recipe: ViewRecipe,
    batch_size: int,
    image_size: tuple[int, int],
    generator: torch.Generator | None,
    device: torch.device,
) -> ViewParams:
    """Draw one view's crop, flip and colour parameters for a batch, on ``device``."""
    crop = draw_crop_params(batch_size, image_size, recipe.scale, recipe.ratio, recipe.flip_p, generator, device)
    u = torch.rand((batch_size, 9), generator=generator, device=device)
    b, c, s, h = recipe.jitter
    jitter = torch.stack(
        [
            1 + (2 * u[:, 0] - 1) * b,
            1 + (2 * u[:, 1] - 1) * c,
            1 + (2 * u[:, 2] - 1) * s,
            (2 * u[:, 3] - 1) * h,
        ],
        dim=1,
    ).clamp(min=0)
    low, high = recipe.blur_sigma
    sigma = torch.where(u[:, 6] < recipe.blur_p, low + u[:, 7] * (high - low), torch.zeros_like(u[:, 7]))
    return ViewParams(
        crop=crop,
        jitter=jitter,
        jitter_on=u[:, 4] < recipe.jitter_p,
        gray=u[:, 5] < recipe.gray_p,
        blur_sigma=sigma,
        solarize=u[:, 8] < recipe.solarize_p,
    )


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``b + factor * (a - b)`` per sample, clamped to [0, 1]."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def apply_view(images: torch.Tensor, params: ViewParams, size: tuple[int, int], blur_kernel: int) -> torch.Tensor:
    """Make one view of ``(B, 3, H, W)`` images in ``[0, 1]`` from drawn ``params``.

    Colour jitter runs brightness, contrast, saturation, hue in that fixed
    order (torchvision shuffles the order per call; we do not, our choice).
    """
    x = apply_crop(images, params.crop, size)
    on = params.jitter_on.view(-1, 1, 1, 1)
    jittered = (x * params.jitter[:, 0].view(-1, 1, 1, 1)).clamp(0, 1)
    gray = rgb_to_grayscale(jittered)
    jittered = _blend(jittered, gray.mean(dim=(2, 3), keepdim=True), params.jitter[:, 1])
    jittered = _blend(jittered, rgb_to_grayscale(jittered), params.jitter[:, 2])
    jittered = adjust_hue(jittered, params.jitter[:, 3] * 2 * math.pi)
    x = torch.where(on, jittered, x)
    x = torch.where(params.gray.view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
    sigma = params.blur_sigma.clamp(min=1e-3).view(-1, 1).expand(-1, 2)
    blurred = gaussian_blur2d(x, (blur_kernel, blur_kernel), sigma)
    x = torch.where((params.blur_sigma > 0).view(-1, 1, 1, 1), blurred, x)
    return torch.where(params.solarize.view(-1, 1, 1, 1), torch.where(x >= 0.5, 1 - x, x), x)


class Views(Stage):
    """``n`` augmented views of each image, from the one decoded batch, on its device.

    Views are cut from ``batch.images`` (in ``[0, 1]``: put ``Views`` before
    ``Normalize``). Randomness is drawn with the batch's generator on its
    device (kornia would draw on the CPU by default; here kornia only
    applies). ``batch.views``, ``batch.view_crops`` and ``batch.view_flips``
    receive the views and their boxes; when the batch records the loader's
    crops, the view boxes are given in source-image pixels, else in pixels of
    ``batch.images``.

    Args:
        n: number of views.
        preset: ``"mae"``, ``"simclr"``, ``"byol"`` or ``"mocov2"``; a preset
            with one recipe per view (BYOL's two) cycles through them.
        size: output side (default: the input side).

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = Views(2, "byol")(Batch(images=torch.rand(4, 3, 32, 32), seed=0))
        >>> len(out.views), tuple(out.views[0].shape), tuple(out.view_crops[1].shape)
        (2, (4, 3, 32, 32), (4, 4))
    """

    def __init__(self, n: int = 2, preset: str = "simclr", size: int | None = None) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        if size is not None and size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.n, self.preset, self.size = int(n), preset, size
        self.recipes = tuple(PRESETS[preset][i % len(PRESETS[preset])] for i in range(n))
        for recipe in self.recipes:
            check_crop_args(recipe.scale, recipe.ratio, recipe.flip_p)

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> list[ViewParams]:
        size = tuple(batch.images.shape[-2:])
        return [draw_view_params(r, len(batch), size, generator, batch.device) for r in self.recipes]

    def apply(self, batch: Batch, params: list[ViewParams]) -> Batch:
        height, width = batch.images.shape[-2:]
        size = (self.size or height, self.size or width)
        kernel = max(3, int(0.1 * size[0]) // 2 * 2 + 1)
        views = [apply_view(batch.images, p, size, kernel) for p in params]
        crops = [p.crop for p in params]
        if batch.crops is not None and batch.flips is not None:
            outer = CropParams(batch.crops, batch.flips)
            crops = [compose_crops(outer, (height, width), c) for c in crops]
        return batch.replace(views=views, view_crops=[c.boxes for c in crops], view_flips=[c.flips for c in crops])

    def extra_repr(self) -> str:
        return f"n={self.n}, preset={self.preset!r}, size={self.size}"
