"""AttMask: mask the patches the model attends to most, read on every batch, batched on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._mask_stage import GuidedPatchMaskStage, cell_grid, draw_on_cells, erase_patches
from ._sampling import check_mask_patch_size, check_ratio, mask_count, rank_cells
from .patch_mask import PatchMask
from .random_mask import mask_from_scores
from .registry import MaskContext, MaskOptions, register_mask

__all__ = ["ATTMASK_MODES", "AttMask", "AttMaskOptions", "attmask_patch_mask"]

ATTMASK_MODES = ("high", "hint", "low")
"""``high``: the most attended cells; ``hint``: the same with a random share of them revealed; ``low``: the
least attended (the paper's ablation)."""


def _check_options(ratio: float, mode: str, hint: float, hint_pool: float) -> float:
    """Raise on a bad option, naming it and what is allowed; return ``ratio``."""
    check_ratio("ratio", ratio)
    if mode not in ATTMASK_MODES:
        raise ValueError(f"mode must be one of {ATTMASK_MODES}, got {mode!r}")
    if not 0 <= hint <= 1:
        raise ValueError(f"hint must be a share of the masked cells in [0, 1], got {hint}")
    if not 0 <= hint_pool <= 1:
        raise ValueError(f"hint_pool must be a share of the cells in [0, 1], got {hint_pool}")
    return ratio


def attmask_patch_mask(
    saliency: torch.Tensor,
    ratio: float = 0.5,
    mode: str = "high",
    hint: float = 0.1,
    generator: torch.Generator | None = None,
    hint_pool: float = 0.1,
) -> PatchMask:
    """AttMask's mask from per-cell ``saliency`` (Kakogeorgiou et al., "What to Hide from Your Students:
    Attention-Guided Masked Image Modeling", ECCV 2022).

    With ``M = round(N * ratio)``: ``high`` masks the ``M`` most salient cells of each sample; ``low`` the
    ``M`` least salient; ``hint`` takes the ``M`` most salient and reveals ``round(M * hint)`` of them as
    hints, drawn uniformly from the ``round(N * hint_pool)`` most salient cells of all (the authors'
    ``show_ratio`` and ``show_max``, 0.1 each), so ``M - round(M * hint)`` cells are masked. Exact ties in the
    saliency are broken at random. Every sample gets the same counts.

    Args:
        saliency: ``(B, Gh, Gw)``; higher is more attended.
        ratio: fraction of cells in the most (or least) attended set, in ``[0, 1)``.
        mode: one of :data:`ATTMASK_MODES`.
        hint: share of that set revealed in ``hint`` mode, in ``[0, 1]``.
        generator: a ``torch.Generator`` on ``saliency``'s device.
        hint_pool: share of all cells, the most salient, that the hints come from.

    Examples:
        >>> import torch
        >>> saliency = torch.arange(16.0).view(1, 4, 4)  # the last cells are the most attended
        >>> g = torch.Generator().manual_seed(0)
        >>> attmask_patch_mask(saliency, 0.25, "high", generator=g).masked.flatten(1).nonzero()[:, 1].tolist()
        [12, 13, 14, 15]
        >>> attmask_patch_mask(saliency, 0.25, "low", generator=g).masked.flatten(1).nonzero()[:, 1].tolist()
        [0, 1, 2, 3]
        >>> attmask_patch_mask(saliency, 0.5, "hint", hint=0.25, generator=g).counts
        (10, 6, 0)
    """
    _check_options(ratio, mode, hint, hint_pool)
    if saliency.ndim != 3:
        raise ValueError(f"saliency must be (B, Gh, Gw), got shape {tuple(saliency.shape)}")
    batch, gh, gw = saliency.shape
    cells = gh * gw
    count = mask_count(cells, ratio)
    flat = saliency.flatten(1).float()
    noise = torch.rand((batch, cells), generator=generator, device=saliency.device)
    ranked = rank_cells(flat, noise, descending=mode != "low")  # exact ties broken at random
    chosen = torch.zeros((batch, cells), dtype=torch.bool, device=saliency.device)
    chosen = chosen.scatter(1, ranked[:, :count], True)
    if mode == "hint":
        pool = min(mask_count(cells, hint_pool), count)
        shown = min(mask_count(count, hint), pool)
        in_pool = torch.zeros_like(chosen).scatter(1, ranked[:, :pool], True)
        # The chosen cells outside the pool stay masked (2); the pool's ranked at random, shown of them revealed.
        noise = torch.rand((batch, cells), generator=generator, device=saliency.device)
        scores = torch.where(in_pool, noise, torch.where(chosen, 2.0, -1.0))
        return mask_from_scores(scores, (gh, gw), count - shown)
    return PatchMask.from_masked(chosen.view(batch, gh, gw), count)


@dataclass
class AttMaskOptions(MaskOptions):
    """``mask.name: attmask``: the fraction of cells in the attended set, which set (``mode``), and the share of
    it revealed as hints (``hint`` mode), drawn from the ``hint_pool`` most attended share of all cells; the
    cells are ``mask_patch_size`` pixels (SimMIM's coarse cells, a multiple of the patch), or single patches
    (``null``)."""

    ratio: float = 0.5
    mode: str = "hint"
    hint: float = 0.1
    hint_pool: float = 0.1
    mask_patch_size: int | None = None


@register_mask(
    "attmask",
    options=AttMaskOptions,
    emits="patch",
    small=lambda patch_size, image_size: AttMaskOptions(),
    coarse_cell="mask_patch_size",
)
class AttMask(GuidedPatchMaskStage):
    """AttMask as a loader stage: the model's saliency, read on every batch, picks the cells to mask.

    For every batch, the bound guide (the recipe binds the objective's ``saliency``: the ViT's last-block
    CLS-to-patch attention, or a CNN's last-stage activation norm, as AMT reads it) scores the batch's
    cells under ``no_grad``, and :func:`attmask_patch_mask` masks the most attended (``high``), the most
    attended less a random share revealed as hints (``hint``, the paper's best), or the least attended
    (``low``) (Kakogeorgiou et al., ECCV 2022).

    Our choices beyond the paper: the paper (on iBOT) reads its EMA teacher's attention; here the guide is
    the objective's, so the online model as of the previous update (MAE and SimMIM have no teacher); the
    paper draws a masking ratio per image from a range as iBOT does, we use one ``ratio`` (0.5, the middle
    of iBOT's range) so counts are exact; hints are drawn uniformly from the attended set
    (``hint`` 0.1 of them, from the most attended ``hint_pool`` 0.1 of all cells, as the authors' code), and
    exact ties in the saliency are broken at random.

    On SimMIM's coarse cells (``mask_patch_size``; our pairing, as the paper pairs AttMask with iBOT and DINO
    on single patches): a cell's saliency is the sum of its patches' (as AMT on SimMIM's cells), the ranking,
    ``ratio``, ``hint`` and ``hint_pool`` count cells, and the mask is regridded to the patch grid, so every
    patch of a cell has the cell's state. The counts are AttMask's ``round``, not SimMIM's ``ceil`` (they
    agree at 0.6 of 16 cells, 32 px images with 8 px cells: 10; at 224 px with 32 px cells they give 29 and
    30 of 49).

    Args:
        ratio: fraction of cells in the attended (or least attended) set.
        patch_size: the mask cell in pixels (the ViT's patch; for CNNs the recipe gives 1/8 of the side).
        mode: one of :data:`ATTMASK_MODES`.
        hint: share of the set revealed in ``hint`` mode.
        hint_pool: share of all cells, the most attended, the hints are drawn from.
        mask_patch_size: side in pixels of the cells ranked and masked, a multiple of ``patch_size``
            (SimMIM's coarse cells), or ``None`` for single patches.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> stage = AttMask(0.5, patch_size=8, mode="hint", hint=0.25, hint_pool=0.25)
        >>> stage.bind(lambda images, grid: torch.rand(len(images), *grid))
        >>> stage(Batch(images=torch.rand(2, 3, 32, 32), seed=0)).mask.counts
        (10, 6, 0)
        >>> cells = AttMask(0.6, patch_size=4, mode="hint", mask_patch_size=8)  # SimMIM's cells, 32 px
        >>> cells.bind(lambda images, grid: torch.rand(len(images), *grid))
        >>> mask = cells(Batch(images=torch.rand(2, 3, 32, 32), seed=0)).mask
        >>> mask.grid, mask.counts, mask.regrid(4, 4).counts  # 10 of 16 cells chosen, 1 revealed
        ((8, 8), (28, 36, 0), (7, 9, 0))
    """

    guide_kind = "saliency"

    def __init__(
        self,
        ratio: float = 0.5,
        patch_size: int = 16,
        mode: str = "hint",
        hint: float = 0.1,
        hint_pool: float = 0.1,
        mask_patch_size: int | None = None,
    ) -> None:
        super().__init__(patch_size)
        self.ratio = _check_options(ratio, mode, hint, hint_pool)
        self.mode, self.hint, self.hint_pool = mode, float(hint), float(hint_pool)
        self.mask_patch_size = check_mask_patch_size(mask_patch_size, self.patch_size)

    @classmethod
    def from_options(cls, options: AttMaskOptions, context: MaskContext) -> AttMask:
        """The stage of the config's ``mask`` section (``options``) at ``context``'s patch and image size."""
        return cls(
            options.ratio, context.patch_size, options.mode, options.hint, options.hint_pool, options.mask_patch_size
        )

    def draw(self, images: torch.Tensor, generator: torch.Generator | None = None) -> PatchMask:
        """The mask for ``(B, C, H, W)`` images, from their saliency (summed per cell on coarse cells)."""
        grid = self.grid_for(images)
        cells = cell_grid(tuple(images.shape[-2:]), self.patch_size, self.mask_patch_size)
        return draw_on_cells(
            self.read_guide(images, grid),
            cells,
            lambda sums: attmask_patch_mask(sums, self.ratio, self.mode, self.hint, generator, self.hint_pool),
        )

    def erase(
        self, images: torch.Tensor, fill: float | torch.Tensor = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw a mask from ``images`` and erase its hidden patches (supervised reuse)."""
        return erase_patches(images, self.draw(images, generator), fill)

    def extra_repr(self) -> str:
        hint = f", hint={self.hint}" if self.mode == "hint" else ""
        cells = "" if self.mask_patch_size is None else f", mask_patch_size={self.mask_patch_size}"
        return f"ratio={self.ratio}, patch_size={self.patch_size}{cells}, mode={self.mode!r}{hint}"
