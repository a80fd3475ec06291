"""SimMIM's masking: random cells of a coarse mask grid, upsampled to the model's patch grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._mask_stage import PatchMaskStage
from ._sampling import ceil_count, check_mask_patch_size, check_ratio, patch_grid
from .patch_mask import PatchMask
from .random_mask import mask_from_scores
from .registry import MaskContext, MaskOptions, register_mask

__all__ = ["SimMIMMask", "SimMIMMaskOptions", "simmim_patch_mask"]


def simmim_patch_mask(
    batch_size: int,
    image_size: tuple[int, int],
    ratio: float = 0.6,
    mask_patch_size: int = 32,
    patch_size: int = 16,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    throw_ratio: float = 0.0,
) -> PatchMask:
    """Mask ``ceil(n * ratio)`` of the ``n`` coarse ``mask_patch_size`` cells, on the model's patch grid.

    Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", 2022:
    uniformly random cells of a coarse grid (32 px), each covering
    ``(mask_patch_size / patch_size)^2`` model patches. The count is the
    reference code's ``ceil`` (224 px at 0.6: 30 of 49 cells), not the
    ``round`` of masklab's other stages (see :func:`ceil_count`).

    Args:
        batch_size: ``B``.
        image_size: ``(H, W)``, multiples of ``mask_patch_size``.
        ratio: fraction of coarse cells masked (SimMIM: 0.6).
        mask_patch_size: side of a coarse mask cell in pixels, a multiple of ``patch_size``.
        patch_size: the model's patch size in pixels.
        generator: a ``torch.Generator`` on ``device``.
        device: where the mask lives.
        throw_ratio: fraction of coarse cells THROWN, also at random: ``ceil(n * throw_ratio)`` of them
            (SimMIM-AMT's counts, random cells: the control that tells AMT's attention from its ratios;
            SimMIM itself throws none).

    Returns:
        A :class:`PatchMask` on the ``(H / patch_size, W / patch_size)`` grid.

    Raises:
        ValueError: a ratio outside ``[0, 1)``, or more cells masked and thrown than there are.

    Examples:
        >>> m = simmim_patch_mask(2, (224, 224), 0.6, 32, 16, torch.Generator().manual_seed(0))
        >>> m.grid, m.counts, m.regrid(7, 7).counts
        ((14, 14), (76, 120, 0), (19, 30, 0))
        >>> simmim_patch_mask(2, (224, 224), 0.44, 32, 16, throw_ratio=0.26).regrid(7, 7).counts
        (14, 22, 13)
    """
    check_ratio("ratio", ratio)
    check_ratio("throw_ratio", throw_ratio)
    if patch_size < 1 or mask_patch_size % patch_size:
        raise ValueError(f"mask_patch_size={mask_patch_size} must be a multiple of patch_size={patch_size}")
    coarse = patch_grid(*image_size, mask_patch_size, what="mask_patch_size")
    fine = patch_grid(*image_size, patch_size)
    cells = coarse[0] * coarse[1]
    count, thrown = ceil_count(cells, ratio), ceil_count(cells, throw_ratio)
    if count + thrown > cells:
        raise ValueError(
            f"ratio={ratio} and throw_ratio={throw_ratio} mask {count} and throw {thrown} of {cells} cells "
            f"({mask_patch_size} px on {image_size[0]}x{image_size[1]}): at most {cells} in all"
        )
    scores = torch.rand((batch_size, cells), generator=generator, device=device)
    return mask_from_scores(scores, coarse, count, thrown).regrid(*fine)


@dataclass
class SimMIMMaskOptions(MaskOptions):
    """``mask.name: simmim``: the fraction of coarse cells masked, their side in pixels, and the fraction thrown
    (0 for SimMIM; the AMT control's 0.26)."""

    ratio: float = 0.75
    mask_patch_size: int = 8
    throw_ratio: float = 0.0


@register_mask(
    "simmim",
    options=SimMIMMaskOptions,
    emits="patch",
    small=lambda patch_size, image_size: SimMIMMaskOptions(ratio=0.6, mask_patch_size=2 * patch_size),
    coarse_cell="mask_patch_size",
)
class SimMIMMask(PatchMaskStage):
    """SimMIM's coarse random masking as a loader stage: ``ceil(n * ratio)`` of ``n`` coarse cells.

    Args:
        ratio: fraction of coarse cells masked, rounded up (SimMIM: 0.6).
        mask_patch_size: coarse cell side in pixels (SimMIM: 32).
        patch_size: the model's patch size in pixels.
        throw_ratio: fraction of coarse cells thrown at random, rounded up (SimMIM: 0; our choice beyond the
            paper, for the study's control of SimMIM-AMT: its 0.44 masked and 0.26 thrown on random cells).

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = SimMIMMask(0.5, mask_patch_size=16, patch_size=4)(Batch(images=torch.zeros(2, 3, 64, 64), seed=0))
        >>> out.mask.grid, out.mask.counts
        ((16, 16), (128, 128, 0))
    """

    def __init__(
        self, ratio: float = 0.6, mask_patch_size: int = 32, patch_size: int = 16, throw_ratio: float = 0.0
    ) -> None:
        super().__init__(patch_size)
        self.ratio = check_ratio("ratio", ratio)
        self.throw_ratio = check_ratio("throw_ratio", throw_ratio)
        if ratio + throw_ratio >= 1:
            raise ValueError(
                f"ratio={ratio} and throw_ratio={throw_ratio} leave no cell visible: keep their sum under 1"
            )
        self.mask_patch_size = check_mask_patch_size(mask_patch_size, patch_size, optional=False)

    @classmethod
    def from_options(cls, options: SimMIMMaskOptions, context: MaskContext) -> SimMIMMask:
        """The stage of the config's ``mask`` section (``options``) at ``context``'s patch and image size."""
        return cls(options.ratio, options.mask_patch_size, context.patch_size, options.throw_ratio)

    def sample(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator | None, device: torch.device
    ) -> PatchMask:
        return simmim_patch_mask(
            batch_size,
            image_size,
            self.ratio,
            self.mask_patch_size,
            self.patch_size,
            generator,
            device,
            self.throw_ratio,
        )

    def extra_repr(self) -> str:
        thrown = f", throw_ratio={self.throw_ratio}" if self.throw_ratio else ""
        return f"ratio={self.ratio}, mask_patch_size={self.mask_patch_size}, patch_size={self.patch_size}{thrown}"
