"""ColorMAE: masks from random noise filtered to a colour, batched on the device.

Hinojosa, Liu and Ghanem, "ColorMAE: Exploring data-independent masking
strategies in Masked AutoEncoders", ECCV 2024. White noise is filtered to a
band of spatial frequencies (its "colour"), and each sample keeps its
highest-valued cells visible: low-pass (red) noise gives large masked and
visible regions, high-pass (blue) noise scattered ones, band-pass (green, the
paper's best) evenly spaced clusters, band-stop (purple) a mix of both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._mask_stage import PatchMaskStage
from ._sampling import check_ratio, mask_count, patch_grid
from .patch_mask import PatchMask
from .random_mask import mask_from_scores
from .registry import MaskContext, MaskOptions, check_choice, register_mask

__all__ = [
    "COLORS",
    "ColorNoiseMask",
    "ColorNoiseMaskOptions",
    "color_filter",
    "color_noise",
    "color_noise_mask",
    "padded_side",
]

COLORS = ("green", "red", "blue", "purple", "white")
"""The noise colours: band-pass, low-pass, high-pass, band-stop, unfiltered (random masking)."""


def padded_side(side: int, coarse: float) -> int:
    """The side of the grid noise is filtered on before the crop to ``side`` (see :func:`color_noise`).

    Opposite edges of the crop lie ``margin + 1`` cells apart around the
    circular FFT; with ``margin = ceil(3 sqrt(2) coarse)`` that is beyond
    three widths of the filtered noise's correlation (a Gaussian of width
    ``sqrt(2) coarse``). Rounded up to a size with no prime factor above 5,
    which the FFT transforms fastest.

    Examples:
        >>> padded_side(14, 1.0), padded_side(8, 1.0), padded_side(14, 0.5)
        (20, 15, 18)
    """
    size = side + math.ceil(3 * math.sqrt(2) * coarse)
    while True:
        rest = size
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 1


def check_sigma(sigma: Sequence[float]) -> tuple[float, float]:
    """``(fine, coarse)`` as floats if ``0 < fine < coarse``, else a ``ValueError`` naming the value."""
    values = tuple(float(s) for s in sigma)
    if len(values) != 2 or not 0 < values[0] < values[1]:
        raise ValueError(f"sigma must be two widths in cells with 0 < fine < coarse, got {tuple(sigma)}")
    return values


def color_filter(
    grid: tuple[int, int], color: str, sigma: tuple[float, float] = (0.5, 1.0), device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The colour's frequency response on a ``(H, W)`` grid, laid out for ``torch.fft.rfft2``.

    With ``L_s`` the response of a Gaussian blur of width ``s`` cells
    (``exp(-2 pi^2 s^2 |f|^2)``) and ``(fine, coarse) = sigma``: red is
    ``L_coarse`` (low-pass), blue ``1 - L_fine`` (high-pass), green
    ``L_fine - L_coarse`` (band-pass, a difference of Gaussians), purple
    ``1 - green`` (band-stop), white ``1``. Red, green and blue split the
    spectrum (they add up to 1).

    Args:
        grid: ``(H, W)`` of the noise.
        color: one of :data:`COLORS`.
        sigma: ``(fine, coarse)`` Gaussian widths in cells.
        device: where the response lives.

    Returns:
        ``(H, W // 2 + 1)`` float32.

    Examples:
        >>> red, green, blue = (color_filter((8, 8), c) for c in ("red", "green", "blue"))
        >>> torch.allclose(red + green + blue, torch.ones(8, 5)), float(green[0, 0]), float(red[0, 0])
        (True, 0.0, 1.0)
    """
    check_choice("color", color, COLORS)
    fine, coarse = check_sigma(sigma)
    fy = torch.fft.fftfreq(grid[0], device=device).view(-1, 1)
    fx = torch.fft.rfftfreq(grid[1], device=device).view(1, -1)
    radius2 = fy**2 + fx**2

    def low(width: float) -> torch.Tensor:
        return torch.exp(-2 * math.pi**2 * width**2 * radius2)

    if color == "red":
        return low(coarse)
    if color == "blue":
        return 1 - low(fine)
    if color == "green":
        return low(fine) - low(coarse)
    if color == "purple":
        return 1 - low(fine) + low(coarse)
    return torch.ones_like(radius2)


def color_noise(
    batch_size: int,
    grid: tuple[int, int],
    color: str = "green",
    sigma: tuple[float, float] = (0.5, 1.0),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Fresh white Gaussian noise filtered to ``color``: one ``(Gh, Gw)`` field per sample.

    The FFT filter is circular, so the noise is drawn and filtered on a
    larger grid (:func:`padded_side`) and cropped to ``(Gh, Gw)``: the field
    does not wrap around the edges, as the paper's crops of larger textures
    do not.

    Args:
        batch_size: ``B``.
        grid: ``(Gh, Gw)``.
        color: one of :data:`COLORS`.
        sigma: ``(fine, coarse)`` Gaussian widths in cells (see :func:`color_filter`).
        generator: a ``torch.Generator`` on ``device``.
        device: where to draw.

    Returns:
        ``(B, Gh, Gw)`` float32.
    """
    check_choice("color", color, COLORS)
    sigma = check_sigma(sigma)
    if color == "white":
        return torch.randn((batch_size, *grid), generator=generator, device=device)
    height, width = padded_side(grid[0], sigma[1]), padded_side(grid[1], sigma[1])
    response = color_filter((height, width), color, sigma, device)
    white = torch.randn((batch_size, height, width), generator=generator, device=device)
    filtered = torch.fft.irfft2(torch.fft.rfft2(white) * response, s=(height, width))
    return filtered[:, : grid[0], : grid[1]]


def color_noise_mask(
    batch_size: int,
    grid: tuple[int, int],
    ratio: float = 0.75,
    color: str = "green",
    sigma: tuple[float, float] = (0.5, 1.0),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> PatchMask:
    """ColorMAE's mask: ``round(N * ratio)`` MASKED cells per sample, the lowest of its coloured noise.

    Each sample's ``N - round(N * ratio)`` highest noise values stay
    VISIBLE (the reference code keeps the strongest values), the rest are
    MASKED; exact counts by ranking, as :func:`mask_from_scores` does.

    Args:
        batch_size: ``B``.
        grid: ``(Gh, Gw)``.
        ratio: fraction of cells masked, in ``[0, 1)`` (the paper: 0.75).
        color: one of :data:`COLORS` (the paper's best: green).
        sigma: ``(fine, coarse)`` Gaussian widths in cells (see :func:`color_filter`).
        generator: a ``torch.Generator`` on ``device``.
        device: where the mask lives.

    Returns:
        A :class:`PatchMask`.

    Examples:
        >>> m = color_noise_mask(4, (14, 14), 0.75, "green", generator=torch.Generator().manual_seed(0))
        >>> m.counts, m.masked.flatten(1).sum(1).tolist()
        ((49, 147, 0), [147, 147, 147, 147])
    """
    check_ratio("ratio", ratio)
    noise = color_noise(batch_size, grid, color, sigma, generator, device)
    return mask_from_scores(-noise.flatten(1), grid, mask_count(grid[0] * grid[1], ratio))


@dataclass
class ColorNoiseMaskOptions(MaskOptions):
    """``mask.name: colormae``: the fraction of patches masked, the noise colour and the filter widths in cells."""

    ratio: float = 0.75
    color: str = "green"
    sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])


@register_mask(
    "colormae",
    options=ColorNoiseMaskOptions,
    emits="patch",
    small=lambda patch_size, image_size: ColorNoiseMaskOptions(),
)
class ColorNoiseMask(PatchMaskStage):
    """ColorMAE's coloured-noise masking as a loader stage: puts a :class:`PatchMask` in ``batch.mask``.

    Where we depart from the paper: it precomputes large noise textures
    once, then for each batch crops windows of the patch grid's size (its
    code: one random crop and flip for a stack of textures). We filter fresh
    noise for every batch on the device (one FFT of a ``(B, Gh + m, Gw + m)``
    tensor, see :func:`padded_side`), so no texture bank is stored, every
    mask is new, and the draw follows the batch's seed. The filters are the
    paper's kinds (a Gaussian low-pass, its complement, their difference,
    its complement); the widths (``sigma``, in cells of the patch grid) are
    ours, chosen so the four colours' masks peak in four different bands on
    a 14x14 grid. The count is masklab's ``round(N * ratio)`` (the reference
    keeps ``int(N * (1 - ratio))`` cells visible; the two agree at 14x14 and
    0.75).

    Args:
        ratio: fraction of patches masked (the paper's MAE setting: 0.75).
        patch_size: the model's patch size in pixels.
        color: one of :data:`COLORS` (default green, the paper's best).
        sigma: ``(fine, coarse)`` Gaussian widths in cells.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> stage = ColorNoiseMask(0.75, patch_size=8, color="red")
        >>> out = stage(Batch(images=torch.zeros(2, 3, 64, 64), seed=0))
        >>> out.mask.grid, out.mask.counts
        ((8, 8), (16, 48, 0))
    """

    def __init__(
        self,
        ratio: float = 0.75,
        patch_size: int = 16,
        color: str = "green",
        sigma: tuple[float, float] = (0.5, 1.0),
    ) -> None:
        super().__init__(patch_size)
        self.ratio = check_ratio("ratio", ratio)
        check_choice("color", color, COLORS)
        self.color = color
        self.sigma = check_sigma(sigma)

    @classmethod
    def from_options(cls, options: ColorNoiseMaskOptions, context: MaskContext) -> ColorNoiseMask:
        """The stage of the config's ``mask`` section (``options``) at ``context``'s patch and image size."""
        return cls(options.ratio, context.patch_size, options.color, tuple(options.sigma))

    def sample(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator | None, device: torch.device
    ) -> PatchMask:
        grid = patch_grid(*image_size, self.patch_size)
        return color_noise_mask(batch_size, grid, self.ratio, self.color, self.sigma, generator, device)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, patch_size={self.patch_size}, color={self.color!r}, sigma={self.sigma}"
