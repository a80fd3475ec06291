"""MixMask: filling-based masking for siamese ConvNets, and its CutMix-like supervised use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import repeat

from masklab.pipeline import Batch, Stage

from ._sampling import check_ratio, mask_count
from .block_mask import block_cells
from .registry import MaskContext, MaskOptions, register_mask

__all__ = ["MixMask", "MixMaskOptions", "MixParams", "mix_images", "mix_targets", "mixmask_params"]

_PARTNERS = ("reverse", "permute")


@dataclass(frozen=True)
class MixParams:
    """One MixMask draw.

    Attributes:
        own: ``(B, 1, H, W)`` float, 1 where a mixed image keeps its own pixels.
        lam: ``(B,)`` float, the own-area fraction ``own.mean()`` per sample.
        partner: ``(B,)`` int64, whose pixels fill the rest: ``x_mix[j]`` takes ``x[partner[j]]``.
        inverse: ``(B,)`` int64, the inverse permutation: ``inverse[partner[j]] == j``.
    """

    own: torch.Tensor
    lam: torch.Tensor
    partner: torch.Tensor
    inverse: torch.Tensor


def mixmask_params(
    batch_size: int,
    image_size: tuple[int, int],
    grid: int = 8,
    ratio: float = 0.5,
    partner: str = "reverse",
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> MixParams:
    """Draw MixMask's block masks and partners.

    Vishniakov, Xing and Shen, "MixMask: Revisiting Masking Strategy for Siamese ConvNets",
    arXiv 2210.11456, 2022: a block mask on a coarse ``grid x grid`` layout marks the cells
    filled from another image; the rest (``M = 1``) is the image's own.
    The authors share one mask per batch; our default draws one per sample
    (``per_sample=False`` gives theirs). Blocks come from masklab's exact
    block sampler, so ``round(grid^2 * ratio)`` cells are filled in every
    sample and ``lam = 1 - that / grid^2``.

    Args:
        batch_size: ``B``.
        image_size: ``(H, W)``, multiples of ``grid``.
        grid: cells per side of the coarse layout (8 at 224 px; 4 at 32 px).
        ratio: fraction of cells filled from the partner.
        partner: ``"reverse"`` (``i -> B - 1 - i``) or ``"permute"`` (random).
        per_sample: one mask per sample, else one for the batch.
        generator: a ``torch.Generator`` on ``device``.
        device: where to draw.
    """
    if partner not in _PARTNERS:
        raise ValueError(f"partner must be one of {_PARTNERS}, got {partner!r}")
    check_ratio("ratio", ratio, allow_zero=False)
    height, width = image_size
    if grid < 1 or height % grid or width % grid:
        raise ValueError(f"image size {height}x{width} is not divisible by the {grid}x{grid} mix grid")
    cell_h, cell_w = height // grid, width // grid
    count = mask_count(grid * grid, ratio)
    draws = batch_size if per_sample else 1
    filled = block_cells(draws, (grid, grid), count, min_cells=1, generator=generator, device=device).cells
    own = repeat((~filled).float(), "b h w -> b 1 (h p) (w q)", p=cell_h, q=cell_w).expand(batch_size, -1, -1, -1)
    lam = own.mean(dim=(1, 2, 3))
    if partner == "reverse":
        order = torch.arange(batch_size - 1, -1, -1, device=device)
    else:
        order = torch.randperm(batch_size, generator=generator, device=device)
    return MixParams(own=own, lam=lam, partner=order, inverse=torch.argsort(order))


def mix_images(images: torch.Tensor, params: MixParams) -> torch.Tensor:
    """``own * x + (1 - own) * x[partner]`` for ``(B, C, H, W)`` images (``own`` is 0 or 1)."""
    return torch.where(params.own.bool(), images, images[params.partner])


def mix_targets(targets: torch.Tensor, params: MixParams, num_classes: int | None = None) -> torch.Tensor:
    """Soft targets ``lam * y + (1 - lam) * y[partner]``.

    Args:
        targets: ``(B,)`` class indices (then ``num_classes`` is needed) or ``(B, K)`` soft targets.
        params: the draw that mixed the images.
        num_classes: ``K`` for index targets.

    Returns:
        ``(B, K)`` float soft targets.
    """
    if targets.ndim == 1:
        if num_classes is None:
            raise ValueError("num_classes is needed to mix integer class targets")
        targets = torch.nn.functional.one_hot(targets.long(), num_classes).float()
    lam = params.lam.to(targets.dtype).view(-1, 1)
    return lam * targets + (1 - lam) * targets[params.partner]


@dataclass
class MixMaskOptions(MaskOptions):
    """``mask.name: mixmask``: the mixing layout's cells per side (4 at 32 px, 8 at 224 px), the fraction
    of cells filled from the partner, how partners pair, and one mask per sample (ours) or per batch."""

    ratio: float = 0.75
    grid: int = 4
    partner: str = "reverse"
    per_sample: bool = True


@register_mask(
    "mixmask",
    options=MixMaskOptions,
    emits="mix",
    small=lambda patch_size, image_size: MixMaskOptions(ratio=0.5, grid=4),
)
class MixMask(Stage):
    """MixMask as a loader stage: mixes the query view, leaves the key view clean.

    The query is ``batch.views[view]`` when the batch has views (from
    :class:`~masklab.transforms.Views`), else ``batch.images``. The stage puts
    ``{"images", "own", "lam", "partner", "inverse"}`` in ``batch.mix``.
    In a supervised loop, :meth:`mix` mixes images and targets (CutMix-like).

    Args:
        grid: cells per side of the coarse layout (8 at 224 px; 4 at 32 px).
        ratio: fraction of cells filled from the partner.
        partner: ``"reverse"`` or ``"permute"``.
        per_sample: one mask per sample (our default) or one per batch (the authors').
        view: which view is the query.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = MixMask(grid=4, ratio=0.5)(Batch(images=torch.rand(4, 3, 32, 32), seed=0))
        >>> out.mix["lam"].tolist(), out.mix["partner"].tolist()
        ([0.5, 0.5, 0.5, 0.5], [3, 2, 1, 0])
    """

    def __init__(
        self, grid: int = 8, ratio: float = 0.5, partner: str = "reverse", per_sample: bool = True, view: int = 0
    ) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be positive, got {grid}")
        if partner not in _PARTNERS:
            raise ValueError(f"partner must be one of {_PARTNERS}, got {partner!r}")
        self.grid = int(grid)
        self.ratio = check_ratio("ratio", ratio, allow_zero=False)
        self.partner, self.per_sample, self.view = partner, bool(per_sample), int(view)

    @classmethod
    def from_options(cls, options: MixMaskOptions, context: MaskContext) -> MixMask:
        """The query is the first view."""
        return cls(options.grid, options.ratio, options.partner, options.per_sample, view=0)

    def _query(self, batch: Batch) -> torch.Tensor:
        if batch.views:
            if not -len(batch.views) <= self.view < len(batch.views):
                raise ValueError(f"MixMask view={self.view} but the batch has {len(batch.views)} views")
            return batch.views[self.view]
        return batch.images

    def draw(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MixParams:
        """Draw masks and partners for ``(B, C, H, W)`` images."""
        return mixmask_params(
            images.shape[0],
            tuple(images.shape[-2:]),
            self.grid,
            self.ratio,
            self.partner,
            self.per_sample,
            generator,
            images.device,
        )

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> MixParams:
        return self.draw(self._query(batch), generator)

    def apply(self, batch: Batch, params: MixParams) -> Batch:
        mixed = mix_images(self._query(batch), params)
        return batch.replace(
            mix={
                "images": mixed,
                "own": params.own,
                "lam": params.lam,
                "partner": params.partner,
                "inverse": params.inverse,
            }
        )

    def mix(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        num_classes: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Supervised reuse: mixed images and soft targets ``lam * y + (1 - lam) * y[partner]``."""
        params = self.draw(images, generator)
        return mix_images(images, params), mix_targets(targets, params, num_classes)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, ratio={self.ratio}, partner={self.partner!r}, per_sample={self.per_sample}"
