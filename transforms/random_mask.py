"""MAE's uniform random masking, batched on the device."""

from __future__ import annotations

import torch

from ._mask_stage import PatchMaskStage
from ._sampling import check_ratio, mask_count, patch_grid, top_cells
from .patch_mask import PatchMask

__all__ = ["RandomMask", "random_patch_mask"]


def random_patch_mask(
    batch_size: int,
    grid: tuple[int, int],
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
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

    Returns:
        A :class:`PatchMask` with exactly ``round(N * ratio)`` MASKED cells per sample.

    Examples:
        >>> import torch
        >>> m = random_patch_mask(4, (14, 14), 0.75, torch.Generator().manual_seed(0))
        >>> m.counts, m.masked.flatten(1).sum(1).tolist()
        ((49, 147, 0), [147, 147, 147, 147])
    """
    check_ratio("ratio", ratio)
    cells = grid[0] * grid[1]
    count = mask_count(cells, ratio)
    scores = torch.rand((batch_size, cells), generator=generator, device=device)
    masked = top_cells(scores, count).view(batch_size, *grid)
    return PatchMask.from_masked(masked, count)


class RandomMask(PatchMaskStage):
    """MAE's random patch masking as a loader stage: puts a :class:`PatchMask` in ``batch.mask``.

    Args:
        ratio: fraction of patches masked (MAE: 0.75).
        patch_size: the model's patch size in pixels; image sides must be multiples of it.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = RandomMask(0.75, patch_size=8)(Batch(images=torch.zeros(2, 3, 32, 32), seed=0))
        >>> out.mask.grid, out.mask.counts
        ((4, 4), (4, 12, 0))
    """

    def __init__(self, ratio: float = 0.75, patch_size: int = 16) -> None:
        super().__init__(patch_size)
        self.ratio = check_ratio("ratio", ratio)

    def sample(self, batch_size, image_size, generator, device) -> PatchMask:
        grid = patch_grid(*image_size, self.patch_size)
        return random_patch_mask(batch_size, grid, self.ratio, generator, device)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, patch_size={self.patch_size}"
