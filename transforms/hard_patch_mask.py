"""HPM: mask the patches a model predicts hardest, easy to hard over training, batched on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from masklab.pipeline import Batch, clamp_progress

from ._mask_stage import FollowsProgress, GuidedPatchMaskStage
from ._sampling import check_ratio, mask_count, rank_cells
from .patch_mask import PatchMask
from .random_mask import mask_from_scores
from .registry import MaskContext, MaskOptions, register_mask

__all__ = ["HardPatchDraw", "HardPatchMask", "HardPatchMaskOptions", "hard_fraction_at", "hard_patch_mask"]


def hard_fraction_at(progress: float, start: float = 0.0, end: float = 0.5) -> float:
    """HPM's easy-to-hard schedule: the share of the masked cells chosen as hardest at training ``progress``.

    ``start + progress * (end - start)``, linear in progress (the paper's
    ``alpha_t``, 0 to 0.5 by default; the authors' code steps it once an epoch).

    Examples:
        >>> [hard_fraction_at(t) for t in (0.0, 0.5, 1.0)]
        [0.0, 0.25, 0.5]
    """
    return start + clamp_progress(progress) * (end - start)


def hard_patch_mask(
    difficulty: torch.Tensor, ratio: float = 0.75, hard_fraction: float = 0.5, generator: torch.Generator | None = None
) -> tuple[PatchMask, torch.Tensor]:
    """Mask the ``K`` cells of highest ``difficulty`` and ``M - K`` more at random, per sample.

    ``M = round(N * ratio)`` cells are MASKED in every sample, of which
    ``K = round(M * hard_fraction)`` are the cells of highest predicted
    difficulty (exact ties broken at random) and the other ``M - K`` are
    drawn uniformly from the remaining cells (Wang et al., "Hard Patches
    Mining for Masked Image Modeling", CVPR 2023). The authors' code floors
    ``K``; we round, as masklab counts cells everywhere.

    Args:
        difficulty: ``(B, Gh, Gw)`` predicted difficulty (e.g. a predicted loss); higher is harder.
        ratio: fraction of cells masked, in ``[0, 1)``.
        hard_fraction: share of the masked cells chosen by difficulty, in ``[0, 1]``.
        generator: a ``torch.Generator`` on ``difficulty``'s device.

    Returns:
        The :class:`PatchMask` and the ``(B, Gh, Gw)`` bool grid of the cells masked for their difficulty.

    Examples:
        >>> import torch
        >>> difficulty = torch.arange(16.0).view(1, 4, 4)  # the last cells are the hardest
        >>> mask, hard = hard_patch_mask(difficulty, 0.5, 0.5, torch.Generator().manual_seed(0))
        >>> mask.counts, hard.flatten(1).nonzero()[:, 1].tolist()
        ((8, 8, 0), [12, 13, 14, 15])
        >>> bool((mask.masked & hard).sum() == 4)
        True
    """
    check_ratio("ratio", ratio)
    if not 0 <= hard_fraction <= 1:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    if difficulty.ndim != 3:
        raise ValueError(f"difficulty must be (B, Gh, Gw), got shape {tuple(difficulty.shape)}")
    batch, gh, gw = difficulty.shape
    cells = gh * gw
    count = mask_count(cells, ratio)
    hard_count = mask_count(count, hard_fraction)
    noise = torch.rand((batch, cells), generator=generator, device=difficulty.device)
    hard = torch.zeros((batch, cells), dtype=torch.bool, device=difficulty.device)
    if hard_count:
        # A random order of the cells, so the stable sort by difficulty breaks ties at random. (Both sorts
        # stable: on the CPU torch's stable sort of short rows is several times faster than its default.)
        hard = hard.scatter(1, rank_cells(difficulty.flatten(1).float(), noise)[:, :hard_count], True)
    # The hard cells outrank every random score in [0, 1): they are masked, then M - K random others.
    mask = mask_from_scores(torch.where(hard, 2.0, noise), (gh, gw), count)
    return mask, hard.view(batch, gh, gw)


@dataclass(frozen=True)
class HardPatchDraw:
    """One :class:`HardPatchMask` draw: the mask and the ``(B, Gh, Gw)`` cells masked for their difficulty."""

    mask: PatchMask
    hard: torch.Tensor


@dataclass
class HardPatchMaskOptions(MaskOptions):
    """``mask.name: hpm``: the fraction of cells masked, and the share of those chosen as hardest at the
    start and at the end of training (linear in between)."""

    ratio: float = 0.75
    start_hard: float = 0.0
    end_hard: float = 0.5


@register_mask(
    "hpm",
    options=HardPatchMaskOptions,
    emits="patch",
    families=("vit",),
    small=lambda patch_size, image_size: HardPatchMaskOptions(),
)
class HardPatchMask(FollowsProgress, GuidedPatchMaskStage):
    """Hard Patches Mining's mask as a loader stage (Wang et al., "Hard Patches
    Mining for Masked Image Modeling", CVPR 2023).

    For every batch, the bound guide (the recipe binds the objective's
    ``difficulty``: :class:`~masklab.objectives.HPM`'s predicted per-patch
    loss for the batch's images, no grad, from the weights of the previous
    update) scores the cells; :func:`hard_patch_mask` masks the hardest
    ``round(M * alpha_t)`` of the ``M = round(N * ratio)`` masked cells and
    the rest at random, where ``alpha_t`` (:func:`hard_fraction_at`) rises
    linearly from ``start_hard`` to ``end_hard`` with training progress
    (``set_progress``, called by the loop): easy (random) masks first, harder
    later. The paper's defaults: ratio 0.75, ``alpha`` from 0 to 0.5.

    Our choices beyond the paper: progress is per update, not per epoch;
    while ``alpha_t`` asks for no hard cell (the start of training with
    ``start_hard=0``) the guide is not called at all, which saves its
    forward pass; ties in the predicted difficulty are broken at random.

    Args:
        ratio: fraction of cells masked.
        patch_size: the model's patch size in pixels (the guide predicts per patch).
        start_hard: share of the masked cells chosen as hardest at progress 0, in ``[0, 1]``.
        end_hard: the same at progress 1.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> stage = HardPatchMask(0.75, patch_size=8)
        >>> stage.bind(lambda images, grid: torch.rand(len(images), *grid))
        >>> stage.set_progress(1.0)
        >>> out = stage(Batch(images=torch.rand(2, 3, 32, 32), seed=0))
        >>> out.mask.counts, stage.hard_count(16), out.extras["hard"].flatten(1).sum(1).tolist()
        ((4, 12, 0), 6, [6, 6])
    """

    guide_kind = "difficulty"

    def __init__(
        self, ratio: float = 0.75, patch_size: int = 16, start_hard: float = 0.0, end_hard: float = 0.5
    ) -> None:
        super().__init__(patch_size)
        self.ratio = check_ratio("ratio", ratio)
        for name, value in (("start_hard", start_hard), ("end_hard", end_hard)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be a share of the masked cells in [0, 1], got {value}")
        self.start_hard, self.end_hard = float(start_hard), float(end_hard)

    @classmethod
    def from_options(cls, options: HardPatchMaskOptions, context: MaskContext) -> HardPatchMask:
        """The stage of the config's ``mask`` section (``options``) at ``context``'s patch and image size."""
        return cls(options.ratio, context.patch_size, options.start_hard, options.end_hard)

    def hard_fraction(self, progress: float | None = None) -> float:
        """``alpha_t`` at ``progress`` (default: the current progress)."""
        return hard_fraction_at(self.progress if progress is None else progress, self.start_hard, self.end_hard)

    def hard_count(self, num_cells: int, progress: float | None = None) -> int:
        """Cells masked for their difficulty, of ``num_cells``, at ``progress`` (default: the current)."""
        return mask_count(mask_count(num_cells, self.ratio), self.hard_fraction(progress))

    def draw(self, images: torch.Tensor, generator: torch.Generator | None = None) -> HardPatchDraw:
        """Mask and hard cells for ``(B, C, H, W)`` images."""
        grid = self.grid_for(images)
        if self.hard_count(grid[0] * grid[1]) == 0:  # all random: the guide's pass would be wasted
            difficulty = torch.zeros((images.shape[0], *grid), device=images.device)
        else:
            difficulty = self.read_guide(images, grid)
        return HardPatchDraw(*hard_patch_mask(difficulty, self.ratio, self.hard_fraction(), generator))

    def apply(self, batch: Batch, params: HardPatchDraw) -> Batch:
        return batch.replace(mask=params.mask).with_extras(hard=params.hard)

    def extra_repr(self) -> str:
        return (
            f"ratio={self.ratio}, patch_size={self.patch_size}, hard={self.start_hard}->{self.end_hard}, "
            f"progress={self.progress:.3f}"
        )
