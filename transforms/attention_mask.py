"""AMT: attention-driven masking and throwing, from a per-image saliency cache."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from masklab.pipeline import Batch

from ._mask_stage import PatchMaskStage, cell_grid, draw_on_cells
from ._sampling import ceil_count, check_mask_patch_size, check_ratio, mask_count, patch_grid
from .patch_mask import PatchMask
from .protocols import Guide
from .random_mask import mask_from_scores, random_patch_mask
from .registry import MaskContext, MaskOptions, register_mask
from .simmim_mask import simmim_patch_mask

__all__ = [
    "AttentionMask",
    "AttentionMaskOptions",
    "align_maps",
    "amt_counts",
    "amt_refresh_epochs",
    "attention_patch_mask",
]

COUNTINGS = ("round", "ceil")
"""How a ratio becomes a count of cells: ``round`` (masklab's rule) or ``ceil`` (SimMIM's, and SimMIM-AMT's)."""


def amt_refresh_epochs(epochs: int, start: float = 0.1, every: float = 0.1) -> list[int]:
    """Epochs at whose start the saliency cache is refreshed.

    AMT's released MAE code refreshes every 40 of 400 epochs from epoch 40
    (10%), its SimMIM code every 40 of 200 from epoch 40 (20%); we state both
    as fractions of the run (default 10%), at least one epoch.

    Examples:
        >>> amt_refresh_epochs(400)[:3], amt_refresh_epochs(10), amt_refresh_epochs(200, 0.2, 0.2)
        ([40, 80, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 80, 120, 160])
    """
    first = max(1, round(start * epochs))
    step = max(1, round(every * epochs))
    return list(range(first, epochs, step))


def align_maps(
    maps: torch.Tensor,
    grid: tuple[int, int],
    crops: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
    source_sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resample per-image maps to the patch grid of each sample's crop.

    ``maps`` cover the centred square of each source image (what the
    refresh pass sees: the uncropped image, resized). Each output cell takes
    the map's (bilinear) value at the cell's centre, mapped through the crop
    box into source pixels, then the row is mirrored where the crop was
    flipped. This is the intent of AMT; the released code always crops the
    map's top-left corner.

    Args:
        maps: ``(B, Hm, Wm)``.
        grid: output ``(Gh, Gw)``.
        crops: ``(B, 4)`` boxes ``(x0, y0, x1, y1)`` in source pixels (``None``: no crop).
        flips: ``(B,)`` bool.
        source_sizes: ``(B, 2)`` source ``(H, W)``.

    Returns:
        ``(B, Gh, Gw)``.
    """
    batch = maps.shape[0]
    gh, gw = grid
    if crops is None or source_sizes is None:
        aligned = F.interpolate(maps.unsqueeze(1).float(), size=grid, mode="bilinear", align_corners=False).squeeze(1)
    else:
        sizes = source_sizes.to(maps.device, torch.float32)
        side = torch.minimum(sizes[:, 0], sizes[:, 1])
        ref_x0, ref_y0 = (sizes[:, 1] - side) / 2, (sizes[:, 0] - side) / 2
        x0, y0, x1, y1 = crops.to(maps.device, torch.float32).unbind(1)
        cx = (torch.arange(gw, device=maps.device, dtype=torch.float32) + 0.5) / gw  # (Gw,)
        cy = (torch.arange(gh, device=maps.device, dtype=torch.float32) + 0.5) / gh
        sx = x0[:, None] + cx[None] * (x1 - x0)[:, None]  # (B, Gw) source pixels
        sy = y0[:, None] + cy[None] * (y1 - y0)[:, None]
        gx = 2 * (sx - ref_x0[:, None]) / side[:, None] - 1
        gy = 2 * (sy - ref_y0[:, None]) / side[:, None] - 1
        sample_at = torch.stack([gx[:, None, :].expand(batch, gh, gw), gy[:, :, None].expand(batch, gh, gw)], dim=-1)
        aligned = F.grid_sample(
            maps.unsqueeze(1).float(), sample_at, mode="bilinear", padding_mode="border", align_corners=False
        )
        aligned = aligned.squeeze(1)
    if flips is not None:
        aligned = torch.where(flips.to(aligned.device).view(-1, 1, 1), aligned.flip(-1), aligned)
    return aligned


def amt_counts(num_cells: int, ratio: float, throw_ratio: float, counting: str = "round") -> tuple[int, int]:
    """``(masked, thrown)`` cells of ``num_cells`` for AMT's ratios.

    ``"round"`` (ours, on single patches): ``round(N * ratio)`` masked and
    ``round(N * (ratio + throw_ratio)) - round(N * ratio)`` thrown, so the
    visible count is what ``ratio + throw_ratio`` leaves. ``"ceil"`` (the
    authors' SimMIM-AMT, on SimMIM's cells): ``ceil(N * ratio)`` masked and
    ``ceil(N * throw_ratio)`` thrown.

    Raises:
        ValueError: an unknown ``counting``, or counts that exceed ``num_cells``.

    Examples:
        >>> amt_counts(49, 0.44, 0.26, "ceil"), amt_counts(49, 0.44, 0.26), amt_counts(196, 0.45, 0.40)
        ((22, 13), (22, 12), (88, 79))
    """
    if counting not in COUNTINGS:
        raise ValueError(f"counting must be one of {COUNTINGS}, got {counting!r}")
    if counting == "ceil":
        masked, thrown = ceil_count(num_cells, ratio), ceil_count(num_cells, throw_ratio)
    else:
        masked = mask_count(num_cells, ratio)
        thrown = mask_count(num_cells, ratio + throw_ratio) - masked
    if masked + thrown > num_cells:
        raise ValueError(
            f"ratio={ratio} and throw_ratio={throw_ratio} ask for {masked} masked and {thrown} thrown of "
            f"{num_cells} cells ({counting}); lower them"
        )
    return masked, thrown


def attention_patch_mask(
    weights: torch.Tensor,
    ratio: float = 0.45,
    throw_ratio: float = 0.40,
    generator: torch.Generator | None = None,
    epsilon: float = 1e-3,
    counting: str = "round",
) -> PatchMask:
    """Weighted sampling without replacement of MASKED then THROWN cells (AMT).

    A Gumbel-top-k draw on ``log(weights + epsilon)`` gives each sample a
    random ordering of its cells where high-weight cells tend to come first:
    the first ``masked`` are MASKED, the next ``thrown`` THROWN, with the
    counts of :func:`amt_counts` (by default ``round(N * ratio)`` and
    ``round(N * (ratio + throw_ratio)) - round(N * ratio)``).

    Args:
        weights: ``(B, Gh, Gw)`` non-negative saliency.
        ratio: fraction masked.
        throw_ratio: fraction thrown.
        generator: a ``torch.Generator`` on the weights' device.
        epsilon: added to the weights, so zero-saliency cells can still be drawn.
        counting: ``"round"`` (ours) or ``"ceil"`` (SimMIM-AMT's), see :func:`amt_counts`.
    """
    check_ratio("ratio", ratio)
    check_ratio("ratio + throw_ratio", ratio + check_ratio("throw_ratio", throw_ratio))
    batch, gh, gw = weights.shape
    cells = gh * gw
    masked, thrown = amt_counts(cells, ratio, throw_ratio, counting)
    u = torch.rand((batch, cells), generator=generator, device=weights.device).clamp_(1e-12, 1 - 1e-7)
    scores = torch.log(weights.flatten(1).float().clamp(min=0) + epsilon) - torch.log(-torch.log(u))
    return mask_from_scores(scores, (gh, gw), masked, thrown)


@dataclass
class AttentionMaskOptions(MaskOptions):
    """``mask.name: amt``: the fractions masked and thrown, the cells they count (``mask_patch_size`` in
    pixels, SimMIM's cells; ``null``: single patches), the random ratio before the first refresh, and
    the saliency refreshes (first, period) as fractions of the run's epochs."""

    ratio: float = 0.75
    throw_ratio: float = 0.0
    mask_patch_size: int | None = None
    warmup_ratio: float = 0.75
    refresh_start: float = 0.1
    refresh_every: float = 0.1


@register_mask(
    "amt",
    options=AttentionMaskOptions,
    emits="patch",
    # Small images (tests, show-masks) get SimMIM-AMT on the cells SimMIM's small options use.
    small=lambda patch_size, image_size: AttentionMaskOptions(
        ratio=0.44, throw_ratio=0.26, mask_patch_size=2 * patch_size, warmup_ratio=0.44
    ),
    coarse_cell="mask_patch_size",
)
class AttentionMask(PatchMaskStage):
    """AMT's masking and throwing as a loader stage (Liu, Gui et al., "Good helper is around you:
    Attention-driven Masked Image Modeling", arXiv 2211.15362).

    What it does with attention: the draw orders cells by saliency, so the
    most-attended cells tend to be MASKED, the middle ones THROWN and the
    least-attended ones kept VISIBLE (as the authors' code, which takes
    masked, then thrown, then kept from one ``torch.multinomial`` draw).

    Keeps a saliency cache ``(num_samples, Gh, Gw)`` on the model's patch
    grid, indexed by dataset index, initialised uniform. Until the first
    refresh it masks at random at ``warmup_ratio`` without throwing;
    afterwards each sample's cached map is aligned with its crop and flip
    (:func:`align_maps`) and drives :func:`attention_patch_mask`. The
    training loop binds the objective's saliency as the guide and refreshes
    the cache (:meth:`refresh`) at :func:`amt_refresh_epochs`; the cache is a
    buffer, so it is checkpointed.

    Two settings, as the authors' two codes:

    - MAE-AMT (``mask_patch_size=None``): single patches, 0.45 masked and
      0.40 thrown (our ``round`` counts, see :func:`amt_counts`: 88 and 79 of
      196, where the authors' MAE code floors to 88 and 78), random at 0.75
      before the first refresh.
    - SimMIM-AMT (``mask_patch_size``, SimMIM's 32 px cells): the ratios
      count cells of ``(mask_patch_size / patch_size)^2`` patches, with the
      authors' counts ``ceil(n * ratio)`` masked and ``ceil(n * throw_ratio)``
      thrown (224 px, 16 px patches: 22 masked and 13 thrown of 49 cells);
      a cell's saliency is the sum of its patches' (the authors sum the
      resized map over each cell); before the first refresh, random cells at
      ``warmup_ratio`` (the authors': the mask ratio, 0.44), as
      :func:`~masklab.transforms.simmim_patch_mask`. The mask is drawn on the
      cell grid and regridded to the patch grid, so every patch of a cell has
      the cell's state. Our choice for the crop: the cached map is aligned on
      the *patch* grid, then summed per cell (the authors resize the map,
      misaligned as :func:`align_maps` says, to the image's pixels, then sum
      per cell).

    Args:
        num_samples: dataset size (cache rows).
        ratio: fraction masked (MAE+AMT: 0.45; SimMIM+AMT: 0.44).
        throw_ratio: fraction thrown (MAE+AMT: 0.40; SimMIM+AMT: 0.26).
        patch_size: the model's patch size in pixels.
        grid: the cache's grid (default: the training grid, set at first use).
        warmup_ratio: random masking ratio before the first refresh (MAE+AMT: 0.75; SimMIM+AMT: 0.44).
        refresh_start: first refresh, as a fraction of the run's epochs (MAE+AMT: 0.1; SimMIM+AMT: 0.2).
        refresh_every: refresh period, as a fraction of the run's epochs (MAE+AMT: 0.1; SimMIM+AMT: 0.2).
        epsilon: added to saliency (a cell's sum, with cells) before sampling.
        mask_patch_size: side in pixels of the cells masked and thrown, a multiple of ``patch_size``
            (SimMIM+AMT: 32), or ``None`` for single patches.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> stage = AttentionMask(2, 0.44, 0.26, patch_size=16, warmup_ratio=0.44, mask_patch_size=32)
        >>> batch = Batch(images=torch.zeros(2, 3, 224, 224), index=torch.tensor([0, 1]), seed=0)
        >>> stage(batch).mask.regrid(7, 7).counts  # warm-up: 22 random cells
        (27, 22, 0)
        >>> stage.bind(lambda images, grid: torch.rand(len(images), *grid))
        >>> stage.refresh([batch], (14, 14))
        >>> stage(batch).mask.regrid(7, 7).counts  # 22 masked and 13 thrown of 49 cells
        (14, 22, 13)
    """

    guide_kind = "saliency"

    def __init__(
        self,
        num_samples: int,
        ratio: float = 0.45,
        throw_ratio: float = 0.40,
        patch_size: int = 16,
        grid: tuple[int, int] | None = None,
        warmup_ratio: float = 0.75,
        refresh_start: float = 0.1,
        refresh_every: float = 0.1,
        epsilon: float = 1e-3,
        mask_patch_size: int | None = None,
    ) -> None:
        super().__init__(patch_size)
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.ratio = check_ratio("ratio", ratio)
        self.throw_ratio = check_ratio("throw_ratio", throw_ratio)
        check_ratio("ratio + throw_ratio", ratio + throw_ratio)
        self.warmup_ratio = check_ratio("warmup_ratio", warmup_ratio)
        if not (0 < refresh_start <= 1 and 0 < refresh_every <= 1):
            raise ValueError(f"refresh_start and refresh_every must be in (0, 1], got {refresh_start}, {refresh_every}")
        self.mask_patch_size = check_mask_patch_size(mask_patch_size, self.patch_size)
        self.refresh_start, self.refresh_every, self.epsilon = refresh_start, refresh_every, epsilon
        self.num_samples = int(num_samples)
        self.register_buffer("cache", torch.ones(self.num_samples, *(grid or (1, 1))))
        # A Python int (saved as the module's extra state), so checking it never syncs a device.
        self.refreshes = 0
        self.guide: Guide | None = None

    @classmethod
    def from_options(cls, options: AttentionMaskOptions, context: MaskContext) -> AttentionMask:
        """A cache row per dataset image, on the training grid."""
        return cls(
            context.num_samples,
            options.ratio,
            options.throw_ratio,
            context.patch_size,
            grid=context.grid,
            warmup_ratio=options.warmup_ratio,
            refresh_start=options.refresh_start,
            refresh_every=options.refresh_every,
            mask_patch_size=options.mask_patch_size,
        )

    @property
    def counting(self) -> str:
        """``"ceil"`` on SimMIM's cells (the authors' SimMIM-AMT), ``"round"`` on single patches."""
        return "round" if self.mask_patch_size is None else "ceil"

    def cell_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(Ch, Cw)``: the grid the ratios count (``mask_patch_size`` cells, else patches)."""
        return cell_grid(image_size, self.patch_size, self.mask_patch_size)

    def get_extra_state(self) -> dict[str, int]:
        return {"refreshes": self.refreshes}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.refreshes = int(state["refreshes"])

    @property
    def active(self) -> bool:
        """Whether a refresh has filled the cache (before it: random masking)."""
        return self.refreshes > 0

    def bind(self, guide: Guide) -> None:
        """The saliency function ``guide(images, grid) -> (B, Gh, Gw)`` used by :meth:`refresh`."""
        self.guide = guide

    def refresh_due(self, epoch: int, epochs: int) -> bool:
        """Whether the saliency cache is refreshed before ``epoch`` (0-based) of ``epochs``."""
        return epoch in amt_refresh_epochs(epochs, self.refresh_start, self.refresh_every)

    def update_cache(self, index: torch.Tensor, maps: torch.Tensor) -> None:
        """Write saliency ``maps`` ``(B, Gh, Gw)`` for dataset ``index`` ``(B,)``."""
        if tuple(self.cache.shape[1:]) != tuple(maps.shape[1:]):
            self.cache = torch.ones(self.num_samples, *maps.shape[1:], device=maps.device, dtype=self.cache.dtype)
        elif self.cache.device != maps.device:
            self.cache = self.cache.to(maps.device)  # keep the cache where the batches are
        self.cache[index.to(maps.device)] = maps.to(self.cache.dtype)

    @torch.no_grad()
    def refresh(self, batches: Iterable[Batch], grid: tuple[int, int], gather: Callable | None = None) -> None:
        """Recompute the cache from uncropped ``batches`` with the bound guide.

        Args:
            batches: batches of uncropped, unflipped images (an evaluation loader).
            grid: the patch grid of the saliency maps.
            gather: optional ``(index, maps) -> (index, maps)`` that collects every
                rank's shard (the loop passes Accelerate's ``gather``).
        """
        if self.guide is None:
            raise RuntimeError("AttentionMask has no guide: the training loop binds the objective's saliency")
        for batch in batches:
            maps = self.guide(batch.images, grid)
            index = batch.index
            if gather is not None:
                index, maps = gather(index, maps)
            self.update_cache(index, maps)
        self.refreshes += 1

    def sample(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator | None, device: torch.device
    ) -> PatchMask:
        """The warm-up draw: random patches (or SimMIM's random cells) at ``warmup_ratio``, nothing thrown."""
        if self.mask_patch_size is None:
            grid = patch_grid(*image_size, self.patch_size)
            return random_patch_mask(batch_size, grid, self.warmup_ratio, generator, device)
        return simmim_patch_mask(
            batch_size, image_size, self.warmup_ratio, self.mask_patch_size, self.patch_size, generator, device
        )

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> PatchMask:
        grid = self.grid_for(batch.images)
        if not self.active:
            return self.sample(len(batch), tuple(batch.images.shape[-2:]), generator, batch.device)
        if batch.index is None:
            raise ValueError("AttentionMask needs batch.index to look up each image's saliency")
        if self.cache.device != batch.device:
            self.cache = self.cache.to(batch.device)  # once, e.g. after loading a checkpoint on the CPU
        maps = self.cache[batch.index]
        weights = align_maps(maps, grid, batch.crops, batch.flips, batch.source_sizes)  # (B, Gh, Gw)
        cells = self.cell_grid(tuple(batch.images.shape[-2:]))
        return draw_on_cells(
            weights,
            cells,
            lambda sums: attention_patch_mask(
                sums, self.ratio, self.throw_ratio, generator, self.epsilon, self.counting
            ),
        )

    def extra_repr(self) -> str:
        cells = "" if self.mask_patch_size is None else f"mask_patch_size={self.mask_patch_size}, "
        return (
            f"num_samples={self.num_samples}, ratio={self.ratio}, throw_ratio={self.throw_ratio}, "
            f"patch_size={self.patch_size}, {cells}warmup_ratio={self.warmup_ratio}, active={self.active}"
        )
