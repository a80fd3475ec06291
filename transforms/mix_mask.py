"""MixMask: filling-based masking for siamese ConvNets, and its CutMix-like supervised use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import repeat

from masklab.pipeline import Batch, Stage

from ._sampling import check_ratio, mask_count
from .block_mask import block_cells
from .registry import MaskContext, MaskOptions, register_mask

__all__ = ["MixMask", "MixMaskOptions", "MixParams", "mix_images", "mix_targets", "mixmask_params", "own_cell_count"]

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


def own_cell_count(grid: int, ratio: float, min_cells: int = 4) -> int:
    """Cells of a ``grid x grid`` layout an image keeps: ``grid^2 - round(grid^2 * ratio)``.

    Raises:
        ValueError: when that leaves no own cell, fills none, or is fewer than ``min_cells``
            (the own region could not be drawn as blocks of ``min_cells``).

    Examples:
        >>> own_cell_count(8, 0.5), own_cell_count(4, 0.5), own_cell_count(4, 0.75)
        (32, 8, 4)
    """
    check_ratio("ratio", ratio, allow_zero=False)
    if grid < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    if min_cells < 1:
        raise ValueError(f"min_cells must be at least 1, got {min_cells}")
    cells = grid * grid
    filled = mask_count(cells, ratio)
    own = cells - filled
    if filled == 0 or own == 0:
        raise ValueError(
            f"ratio={ratio} fills {filled} of the {cells} cells of a {grid}x{grid} mix grid, leaving {own} own: "
            "nothing would be mixed; choose a ratio that fills some cells and keeps some"
        )
    if own < min_cells:
        raise ValueError(
            f"ratio={ratio} leaves {own} own cells of the {cells} of a {grid}x{grid} mix grid, fewer than "
            f"min_cells={min_cells}: the own region cannot be drawn as blocks; lower ratio or min_cells, or "
            "use a finer grid"
        )
    return own


def mixmask_params(
    batch_size: int,
    image_size: tuple[int, int],
    grid: int = 8,
    ratio: float = 0.5,
    partner: str = "reverse",
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    min_cells: int = 4,
) -> MixParams:
    """Draw MixMask's block masks and partners.

    Vishniakov, Xing and Shen, "MixMask: Revisiting Masking Strategy for Siamese ConvNets",
    arXiv 2210.11456, 2022: a BEiT-style block mask on a coarse ``grid x grid``
    layout marks each image's *own* region (``M = 1``, as the authors' code,
    whose block generator's blocks are what the image keeps); the partner
    fills the rest. The own region is drawn by :func:`~masklab.transforms.block_cells`
    with blocks of at least ``min_cells`` cells (BEiT's generator's 4).
    The authors share one mask per batch; our default draws one per sample
    (``per_sample=False`` gives theirs). Our exact block sampler keeps
    ``grid^2 - round(grid^2 * ratio)`` own cells in every sample, so
    ``lam = 1 - round(grid^2 * ratio) / grid^2`` exactly (the authors'
    generator can stop short of its count; their ``lam`` is the mask's mean).

    Args:
        batch_size: ``B``.
        image_size: ``(H, W)``, multiples of ``grid``.
        grid: cells per side of the coarse layout (8 at 224 px; 4 at 32 px).
        ratio: fraction of cells filled from the partner.
        partner: ``"reverse"`` (``i -> B - 1 - i``) or ``"permute"`` (random).
        per_sample: one mask per sample, else one for the batch.
        generator: a ``torch.Generator`` on ``device``.
        device: where to draw.
        min_cells: smallest block of the own region, in cells (BEiT's and the authors': 4).

    Raises:
        ValueError: a ratio that leaves no own or no filled cell, or fewer own cells than
            ``min_cells`` (see :func:`own_cell_count`).

    Examples:
        >>> p = mixmask_params(2, (32, 32), grid=4, ratio=0.5, generator=torch.Generator().manual_seed(0))
        >>> p.lam.tolist(), p.own.shape, p.partner.tolist()
        ([0.5, 0.5], torch.Size([2, 1, 32, 32]), [1, 0])
    """
    if partner not in _PARTNERS:
        raise ValueError(f"partner must be one of {_PARTNERS}, got {partner!r}")
    own_count = own_cell_count(grid, ratio, min_cells)
    height, width = image_size
    if height % grid or width % grid:
        raise ValueError(f"image size {height}x{width} is not divisible by the {grid}x{grid} mix grid")
    cell_h, cell_w = height // grid, width // grid
    draws = batch_size if per_sample else 1
    own_cells = block_cells(draws, (grid, grid), own_count, min_cells=min_cells, generator=generator, device=device)
    own = repeat(own_cells.cells.float(), "b h w -> b 1 (h p) (w q)", p=cell_h, q=cell_w)
    own = own.expand(batch_size, -1, -1, -1)
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
    of cells filled from the partner, how partners pair, one mask per sample (ours) or per batch, and the
    smallest block of the own region in cells."""

    ratio: float = 0.75
    grid: int = 4
    partner: str = "reverse"
    per_sample: bool = True
    min_cells: int = 4


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

    The own region (``own``, 1 where the image keeps its pixels) is a union of
    blocks of at least ``min_cells`` cells; see :func:`mixmask_params`.

    Args:
        grid: cells per side of the coarse layout (8 at 224 px; 4 at 32 px).
        ratio: fraction of cells filled from the partner.
        partner: ``"reverse"`` or ``"permute"``.
        per_sample: one mask per sample (our default) or one per batch (the authors').
        view: which view is the query.
        min_cells: smallest block of the own region, in cells (BEiT's and the authors': 4).

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = MixMask(grid=4, ratio=0.5)(Batch(images=torch.rand(4, 3, 32, 32), seed=0))
        >>> out.mix["lam"].tolist(), out.mix["partner"].tolist()
        ([0.5, 0.5, 0.5, 0.5], [3, 2, 1, 0])
    """

    def __init__(
        self,
        grid: int = 8,
        ratio: float = 0.5,
        partner: str = "reverse",
        per_sample: bool = True,
        view: int = 0,
        min_cells: int = 4,
    ) -> None:
        super().__init__()
        if partner not in _PARTNERS:
            raise ValueError(f"partner must be one of {_PARTNERS}, got {partner!r}")
        own_cell_count(grid, ratio, min_cells)
        self.grid, self.min_cells = int(grid), int(min_cells)
        self.ratio = check_ratio("ratio", ratio, allow_zero=False)
        self.partner, self.per_sample, self.view = partner, bool(per_sample), int(view)

    @classmethod
    def from_options(cls, options: MixMaskOptions, context: MaskContext) -> MixMask:
        """The query is the first view."""
        return cls(
            options.grid, options.ratio, options.partner, options.per_sample, view=0, min_cells=options.min_cells
        )

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
            self.min_cells,
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
        return (
            f"grid={self.grid}, ratio={self.ratio}, partner={self.partner!r}, per_sample={self.per_sample}, "
            f"min_cells={self.min_cells}"
        )
