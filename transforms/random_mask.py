"""MAE's uniform random masking, batched on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._mask_stage import PatchMaskStage
from ._sampling import check_ratio, mask_count, patch_grid, top_cells
from .patch_mask import MASKED, THROWN, VISIBLE, PatchMask
from .registry import MaskContext, MaskOptions, register_mask

__all__ = ["RandomMask", "RandomMaskOptions", "mask_from_scores", "random_patch_mask"]


def mask_from_scores(scores: torch.Tensor, grid: tuple[int, int], num_masked: int, num_thrown: int = 0) -> PatchMask:
    """Rank the cells of each sample by ``scores`` (highest first): MASKED, then THROWN, the rest VISIBLE.

    Args:
        scores: ``(B, Gh * Gw)`` float scores (give them a random tie-break).
        grid: ``(Gh, Gw)``.
        num_masked: cells MASKED per sample.
        num_thrown: cells THROWN per sample, those ranked right after the masked ones.
    """
    batch, cells = scores.shape
    if num_masked < 0 or num_thrown < 0 or num_masked + num_thrown > cells:
        raise ValueError(f"cannot mask {num_masked} and throw {num_thrown} of {cells} cells")
    if num_thrown == 0:
        return PatchMask.from_masked(top_cells(scores, num_masked).view(batch, *grid), num_masked)
    order = torch.argsort(scores, dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(cells, device=scores.device).expand(batch, cells))
    states = torch.where(rank < num_masked, MASKED, torch.where(rank < num_masked + num_thrown, THROWN, VISIBLE))
    return PatchMask(
        states.to(torch.uint8).view(batch, *grid), (cells - num_masked - num_thrown, num_masked, num_thrown)
    )


def random_patch_mask(
    batch_size: int,
    grid: tuple[int, int],
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    throw_ratio: float = 0.0,
) -> PatchMask:
    """Mask ``round(N * ratio)`` cells of each sample, uniformly at random.

    Per sample, a uniformly random ordering of the ``N = Gh * Gw`` cells; the
    first ``round(N * ratio)`` are MASKED (He et al., "Masked Autoencoders
    Are Scalable Vision Learners", 2022), drawn for the whole batch at once.

    Args:
        batch_size: ``B``.
        grid: ``(Gh, Gw)``.
        ratio: fraction of cells masked, in ``[0, 1)``.
        generator: a ``torch.Generator`` on ``device``, or ``None`` for the global one.
        device: where the mask lives.
        throw_ratio: fraction of cells THROWN (dropped everywhere), drawn at
            random too: the cells ranked ``round(N * ratio)`` to
            ``round(N * (ratio + throw_ratio))`` (AMT's counts, random order).

    Returns:
        A :class:`PatchMask` with exactly ``round(N * ratio)`` MASKED cells per sample.

    Examples:
        >>> import torch
        >>> m = random_patch_mask(4, (14, 14), 0.75, torch.Generator().manual_seed(0))
        >>> m.counts, m.masked.flatten(1).sum(1).tolist()
        ((49, 147, 0), [147, 147, 147, 147])
    """
    check_ratio("ratio", ratio)
    check_ratio("ratio + throw_ratio", ratio + check_ratio("throw_ratio", throw_ratio))
    cells = grid[0] * grid[1]
    count = mask_count(cells, ratio)
    thrown = mask_count(cells, ratio + throw_ratio) - count
    scores = torch.rand((batch_size, cells), generator=generator, device=device)
    return mask_from_scores(scores, grid, count, thrown)


@dataclass
class RandomMaskOptions(MaskOptions):
    """``mask.name: random``: the fraction of patches masked, and of those thrown."""

    ratio: float = 0.75
    throw_ratio: float = 0.0


@register_mask(
    "random", options=RandomMaskOptions, emits="patch", small=lambda patch_size, image_size: RandomMaskOptions()
)
class RandomMask(PatchMaskStage):
    """MAE's random patch masking as a loader stage: puts a :class:`PatchMask` in ``batch.mask``.

    Args:
        ratio: fraction of patches masked (MAE: 0.75).
        patch_size: the model's patch size in pixels; image sides must be multiples of it.
        throw_ratio: fraction of patches thrown at random (0 for MAE).

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = RandomMask(0.75, patch_size=8)(Batch(images=torch.zeros(2, 3, 32, 32), seed=0))
        >>> out.mask.grid, out.mask.counts
        ((4, 4), (4, 12, 0))
    """

    def __init__(self, ratio: float = 0.75, patch_size: int = 16, throw_ratio: float = 0.0) -> None:
        super().__init__(patch_size)
        self.ratio = check_ratio("ratio", ratio)
        self.throw_ratio = check_ratio("throw_ratio", throw_ratio)
        check_ratio("ratio + throw_ratio", self.ratio + self.throw_ratio)

    @classmethod
    def from_options(cls, options: RandomMaskOptions, context: MaskContext) -> RandomMask:
        """The stage of the config's ``mask`` section (``options``) at ``context``'s patch and image size."""
        return cls(options.ratio, context.patch_size, options.throw_ratio)

    def sample(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator | None, device: torch.device
    ) -> PatchMask:
        grid = patch_grid(*image_size, self.patch_size)
        return random_patch_mask(batch_size, grid, self.ratio, generator, device, self.throw_ratio)

    def extra_repr(self) -> str:
        throw = f", throw_ratio={self.throw_ratio}" if self.throw_ratio else ""
        return f"ratio={self.ratio}, patch_size={self.patch_size}{throw}"
