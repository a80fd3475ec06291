"""The shells shared by patch-mask stages: hyper-parameters, the grid, ``erase``; a model's guide read per
batch; training progress."""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import reduce

from masklab.pipeline import Batch, Stage, clamp_progress

from ._sampling import patch_grid
from .patch_mask import VISIBLE, PatchMask
from .protocols import Guide

__all__ = [
    "FollowsProgress",
    "GuidedPatchMaskStage",
    "PatchMaskStage",
    "cell_grid",
    "draw_on_cells",
    "erase_patches",
]


def erase_patches(images: torch.Tensor, mask: PatchMask, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Replace the pixels of every non-VISIBLE cell of ``mask`` by ``fill``.

    Patch erasing for supervised training: a regulariser in the family of
    Cutout and random erasing, with masklab's mask generators.

    Args:
        images: ``(B, C, H, W)``.
        mask: a :class:`PatchMask` whose grid divides ``H x W``.
        fill: a value, or a tensor broadcastable to ``images`` (e.g. per-channel means).

    Returns:
        A new ``(B, C, H, W)`` tensor.
    """
    hidden = (mask.to_pixels(*images.shape[-2:]) != VISIBLE).unsqueeze(1)
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    return torch.where(hidden, fill, images)


def cell_grid(image_size: tuple[int, int], patch_size: int, mask_patch_size: int | None) -> tuple[int, int]:
    """``(Ch, Cw)``: the grid a ratio counts, of ``mask_patch_size`` cells (SimMIM's), or of patches (``None``)."""
    if mask_patch_size is None:
        return patch_grid(*image_size, patch_size)
    return patch_grid(*image_size, mask_patch_size, what="mask_patch_size")


def draw_on_cells(
    weights: torch.Tensor, cells: tuple[int, int], draw: Callable[[torch.Tensor], PatchMask]
) -> PatchMask:
    """A mask drawn from per-cell weights on a coarser grid, on the patch grid of ``weights``.

    ``weights`` ``(B, Gh, Gw)`` (saliency on the patch grid) are summed in float32 over each cell of the
    ``cells`` grid (which must divide the patch grid), ``draw`` makes a :class:`PatchMask` on the cell grid from the sums, and
    the mask is regridded to the patch grid, so every patch of a cell has the cell's state (SimMIM's coarse
    cells, as AMT and AttMask read them). With ``cells`` the patch grid, ``draw(weights)`` as is.

    Examples:
        >>> import torch
        >>> from masklab.transforms import mask_from_scores
        >>> weights = torch.zeros(1, 4, 4)
        >>> weights[0, 0, 3] = 1.0  # one hot patch: its 2x2 cell (top right) sums highest
        >>> mask = draw_on_cells(weights, (2, 2), lambda sums: mask_from_scores(sums.flatten(1), (2, 2), 1))
        >>> mask.grid, mask.counts, mask.masked[0].int().tolist()
        ((4, 4), (12, 4, 0), [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    """
    grid = tuple(weights.shape[-2:])
    if cells == grid:
        return draw(weights)
    if grid[0] % cells[0] or grid[1] % cells[1]:
        raise ValueError(f"the {cells[0]}x{cells[1]} cell grid does not divide the {grid[0]}x{grid[1]} patch grid")
    p, q = grid[0] // cells[0], grid[1] // cells[1]
    return draw(reduce(weights.float(), "b (h p) (w q) -> b h w", "sum", p=p, q=q)).regrid(*grid)


class PatchMaskStage(Stage):
    """Base of the stages that put a :class:`PatchMask` in ``batch.mask``.

    Subclasses implement :meth:`sample` (the functional draw on a grid).
    """

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.patch_size = int(patch_size)

    def grid_for(self, images: torch.Tensor) -> tuple[int, int]:
        """``(Gh, Gw)`` for ``images``; raises if the size is not divisible by the patch."""
        return patch_grid(images.shape[-2], images.shape[-1], self.patch_size)

    def sample(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator | None, device: torch.device
    ) -> PatchMask:
        """Draw a ``batch_size`` mask over the patch grid of ``image_size`` on ``device``, from ``generator``."""
        raise NotImplementedError

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> PatchMask:
        return self.sample(len(batch), tuple(batch.images.shape[-2:]), generator, batch.device)

    def apply(self, batch: Batch, params: PatchMask) -> Batch:
        return batch.replace(mask=params)

    def erase(
        self, images: torch.Tensor, fill: float | torch.Tensor = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw a mask for ``images`` (``(B, C, H, W)``) and erase its hidden patches (supervised reuse)."""
        mask = self.sample(images.shape[0], tuple(images.shape[-2:]), generator, images.device)
        return erase_patches(images, mask, fill)


class GuidedPatchMaskStage(PatchMaskStage):
    """Base of the stages that read a model's guide on every batch's images (EHM's affinity, HPM's difficulty).

    Subclasses set ``guide_kind`` and implement :meth:`draw` (``images, generator -> params`` with a
    ``mask``); the loop binds the guide (:class:`~masklab.transforms.protocols.GuidedStage`).
    """

    guide_kind: str

    def __init__(self, patch_size: int) -> None:
        super().__init__(patch_size)
        self.guide: Guide | None = None

    def bind(self, guide: Guide) -> None:
        """The objective's ``guidance(guide_kind)``, read on every batch."""
        self.guide = guide

    def read_guide(self, images: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The guide's maps for ``(B, C, H, W)`` images, read under ``no_grad``; each sample's must be ``shape``."""
        if self.guide is None:
            raise RuntimeError(
                f"{type(self).__name__} has no guide: the training loop binds the objective's {self.guide_kind} "
                f"(stage.bind(objective.guidance({self.guide_kind!r})))"
            )
        grid = self.grid_for(images)
        with torch.no_grad():
            maps = self.guide(images, grid)
        expected = (images.shape[0], *shape)
        if tuple(maps.shape) != expected:
            raise ValueError(
                f"the guide returned {self.guide_kind} of shape {tuple(maps.shape)}; the {grid[0]}x{grid[1]} grid "
                f"of patch_size={self.patch_size} needs {expected}"
            )
        return maps

    def draw(self, images: torch.Tensor, generator: torch.Generator | None = None):
        raise NotImplementedError

    def sample(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator | None, device: torch.device
    ) -> PatchMask:
        raise TypeError(
            f"{type(self).__name__} draws from the images' {self.guide_kind}: call it on a Batch, or use erase(images)"
        )

    def make_params(self, batch: Batch, generator: torch.Generator | None):
        return self.draw(batch.images, generator)

    def erase(
        self, images: torch.Tensor, fill: float | torch.Tensor = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw a mask from ``images`` and erase its hidden patches (supervised reuse)."""
        return erase_patches(images, self.draw(images, generator).mask, fill)


class FollowsProgress:
    """Training progress for a stage whose draw evolves with it (:class:`~masklab.transforms.protocols.ProgressAware`),
    saved with the stage's state."""

    progress: float = 0.0  # a Python float, set by the loop, so reading it never syncs a device

    def set_progress(self, progress: float) -> None:
        """Where training is, in [0, 1]."""
        self.progress = clamp_progress(progress)

    def get_extra_state(self) -> dict[str, float]:
        return {"progress": self.progress}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.progress = float(state["progress"])
