"""I-JEPA's multi-block masks: target blocks and a context block, batched on the device.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture", CVPR 2023: the encoder sees one large context
block with the target blocks cut out, and the targets are predicted. Here the
blocks become a :class:`PatchMask` for the masked-image objectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._mask_stage import PatchMaskStage
from ._sampling import patch_grid, top_cells
from .patch_mask import MASKED, THROWN, VISIBLE, PatchMask
from .registry import MaskContext, MaskOptions, register_mask

__all__ = [
    "MultiBlockDraw",
    "MultiBlockMask",
    "MultiBlockMaskOptions",
    "block_sizes",
    "multiblock_cells",
    "multiblock_patch_mask",
]


def _check_range(name: str, values, low: float, high: float | None) -> tuple[float, float]:
    """``(a, b)`` as floats if ``low < a <= b`` (and ``b <= high``), else a ``ValueError`` naming the value."""
    pair = tuple(float(v) for v in values)
    bound = f"{low} < low <= high" + (f" <= {high}" if high is not None else "")
    if len(pair) != 2 or not low < pair[0] <= pair[1] or (high is not None and pair[1] > high):
        raise ValueError(f"{name} must be two numbers with {bound}, got {tuple(values)}")
    return pair


def check_multiblock_args(
    num_targets: int,
    target_scale: tuple[float, float],
    target_aspect: tuple[float, float],
    context_scale: tuple[float, float],
    context_aspect: tuple[float, float],
    min_keep: int,
    tries: int,
) -> None:
    """The checked arguments of :func:`multiblock_cells`; a ``ValueError`` naming the first bad one."""
    if int(num_targets) != num_targets or num_targets < 1:
        raise ValueError(f"num_targets must be a positive integer, got {num_targets}")
    if int(min_keep) != min_keep or min_keep < 1:
        raise ValueError(f"min_keep must be a positive integer (visible cells per sample), got {min_keep}")
    if int(tries) != tries or tries < 1:
        raise ValueError(f"tries must be a positive integer, got {tries}")
    return (
        int(num_targets),
        _check_range("target_scale", target_scale, 0, 1),
        _check_range("target_aspect", target_aspect, 0, None),
        _check_range("context_scale", context_scale, 0, 1),
        _check_range("context_aspect", context_aspect, 0, None),
        int(min_keep),
        int(tries),
    )


def block_sizes(
    grid: tuple[int, int],
    scale: tuple[float, float],
    aspect: tuple[float, float],
    count: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``count`` block sizes ``(h, w)`` on a ``(Gh, Gw)`` grid, as I-JEPA draws them.

    A scale uniform in ``scale`` gives ``floor(N * scale)`` cells, an aspect
    (height / width) uniform in ``aspect``; then ``h = round(sqrt(cells *
    aspect))``, ``w = round(sqrt(cells / aspect))``, each kept within
    ``[1, side]``. The reference code uses one random number for both the
    scale and the aspect; we draw them apart.

    Returns:
        ``(count, 2)`` int64 on ``device``.

    Examples:
        >>> block_sizes((14, 14), (1.0, 1.0), (1.0, 1.0)).tolist()
        [[14, 14]]
    """
    gh, gw = grid
    u = torch.rand((count, 2), generator=generator, device=device)
    cells = torch.floor(gh * gw * (scale[0] + u[:, 0] * (scale[1] - scale[0])) + 1e-6)
    ratio = aspect[0] + u[:, 1] * (aspect[1] - aspect[0])
    h = torch.round(torch.sqrt(cells * ratio)).clamp(1, gh)
    w = torch.round(torch.sqrt(cells / ratio)).clamp(1, gw)
    return torch.stack([h, w], dim=1).long()


def _corners(sizes: torch.Tensor, shape: tuple[int, ...], grid, generator, device) -> torch.Tensor:
    """``(*shape, 2)`` uniform ``(top, left)`` corners of blocks of ``sizes`` (``(2,)``) that fit ``grid``."""
    u = torch.rand((*shape, 2), generator=generator, device=device)
    room = torch.stack([grid[0] - sizes[0], grid[1] - sizes[1]]) + 1  # on the device: no host copy
    return torch.floor(u * room).long()


def _rectangles(corners: torch.Tensor, sizes: torch.Tensor, grid) -> torch.Tensor:
    """``(*shape, Gh, Gw)`` bool: the blocks of ``sizes`` at ``corners`` (``(*shape, 2)``)."""
    top, left = corners.unbind(-1)
    rows = torch.arange(grid[0], device=corners.device)
    cols = torch.arange(grid[1], device=corners.device)
    in_rows = (rows >= top[..., None]) & (rows < (top + sizes[0])[..., None])
    in_cols = (cols >= left[..., None]) & (cols < (left + sizes[1])[..., None])
    return in_rows[..., :, None] & in_cols[..., None, :]


def _cells_inside(cells: torch.Tensor, corners: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``(B, R)``: the True cells of ``cells`` (``(B, Gh, Gw)``) inside each of R blocks (``corners``:
    ``(B, R, 2)``), from the summed-area table, without drawing the blocks."""
    table = F.pad(cells.int().cumsum(1).cumsum(2), (1, 0, 1, 0)).flatten(1)  # (B, (Gh + 1) * (Gw + 1))
    width = cells.shape[2] + 1
    top, left = corners.unbind(-1)
    bottom, right = top + sizes[0], left + sizes[1]

    def at(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return table.gather(1, row * width + col)

    return at(bottom, right) - at(top, right) - at(bottom, left) + at(top, left)


@dataclass(frozen=True)
class MultiBlockDraw:
    """What :func:`multiblock_cells` drew, before the counts are evened out.

    Attributes:
        targets: ``(B, K, Gh, Gw)`` bool, the K target blocks of each sample (they may overlap).
        context: ``(B, Gh, Gw)`` bool, the chosen context block.
        visible: ``(B, Gh, Gw)`` bool, the context without the targets (and any cells given back).
        masked: ``(B, Gh, Gw)`` bool, the union of the targets less any cells given back to the context.
        target_size: ``(2,)`` the ``(h, w)`` of every target block of the batch.
        context_size: ``(2,)`` the ``(h, w)`` of the batch's context block.
        corners: ``(B, K + 1, 2)`` ``(top, left)`` of the targets, then of the context.
        given_back: ``(B,)`` target cells given back to the context to reach ``min_keep``.
    """

    targets: torch.Tensor
    context: torch.Tensor
    visible: torch.Tensor
    masked: torch.Tensor
    target_size: torch.Tensor
    context_size: torch.Tensor
    corners: torch.Tensor
    given_back: torch.Tensor


def multiblock_cells(
    batch_size: int,
    grid: tuple[int, int],
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    context_aspect: tuple[float, float] = (1.0, 1.0),
    min_keep: int = 10,
    tries: int = 20,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> MultiBlockDraw:
    """Draw I-JEPA's target and context blocks for a whole batch at once, with no device sync.

    As the paper's collator: one target size and one context size per
    batch (:func:`block_sizes`), ``num_targets`` target blocks per sample at
    independent uniform positions, and a context block that must keep at
    least ``min_keep`` cells outside the targets: ``tries`` context
    positions are drawn per sample and the first that does is taken (the
    reference retries 20 times). Where none does, the reference lets the
    context overlap the targets; we take the try with the most such cells
    and give back, from the targets to the context, random target cells
    inside the context until ``min_keep`` are visible (never a sample's last
    target cell; the reference asks for more than ``min_keep``). Positions cover the whole grid (the reference's
    ``randint(0, side - h)`` never reaches the last row or column, and it
    shrinks a block that spans a side by one).

    Args:
        batch_size: ``B``.
        grid: ``(Gh, Gw)``.
        num_targets: target blocks per sample (I-JEPA: 4).
        target_scale: range of a target block's share of the grid (I-JEPA: 0.15-0.2).
        target_aspect: range of a target block's height / width (I-JEPA: 0.75-1.5).
        context_scale: range of the context block's share of the grid (I-JEPA: 0.85-1.0).
        context_aspect: range of the context block's height / width (I-JEPA: square).
        min_keep: context cells outside the targets each sample needs.
        tries: context positions drawn per sample.
        generator: a ``torch.Generator`` on ``device``.
        device: where to draw.

    Returns:
        A :class:`MultiBlockDraw`.
    """
    num_targets, target_scale, target_aspect, context_scale, context_aspect, min_keep, tries = check_multiblock_args(
        num_targets, target_scale, target_aspect, context_scale, context_aspect, min_keep, tries
    )
    batch = batch_size
    target_size = block_sizes(grid, target_scale, target_aspect, 1, generator, device)[0]
    context_size = block_sizes(grid, context_scale, context_aspect, 1, generator, device)[0]
    target_corners = _corners(target_size, (batch, num_targets), grid, generator, device)
    targets = _rectangles(target_corners, target_size, grid)  # (B, K, Gh, Gw)
    union = targets.any(1)
    # Cells each context try keeps outside the targets, counted without drawing the tries.
    context_corners = _corners(context_size, (batch, tries), grid, generator, device)
    free = context_size.prod() - _cells_inside(union, context_corners, context_size)  # (B, tries)
    good = free >= min_keep
    choice = torch.where(good.any(1), good.int().argmax(1), free.argmax(1))
    pick = torch.arange(batch, device=device)
    chosen = context_corners[pick, choice]  # (B, 2)
    context = _rectangles(chosen, context_size, grid)
    corners = torch.cat([target_corners, chosen[:, None]], dim=1)

    # Give back random target cells inside the context where it keeps too few.
    overlap = (context & union).flatten(1)
    need = (min_keep - free[pick, choice]).clamp(min=0)
    need = torch.minimum(need, torch.minimum(overlap.sum(1), union.flatten(1).sum(1) - 1))
    scores = torch.rand((batch, overlap.shape[1]), generator=generator, device=device) + 2 * overlap.float()
    # At most min_keep cells go back: a top-k of that many, not a sort of every cell.
    ranked = torch.topk(scores, min(min_keep, overlap.shape[1]), dim=1).indices
    taken = torch.arange(ranked.shape[1], device=device) < need[:, None]
    back = torch.zeros_like(overlap).scatter_(1, ranked, taken).view_as(union)
    masked = union & ~back
    return MultiBlockDraw(
        targets=targets,
        context=context,
        visible=context & ~masked,
        masked=masked,
        target_size=target_size,
        context_size=context_size,
        corners=corners,
        given_back=need,
    )


def multiblock_patch_mask(
    batch_size: int,
    grid: tuple[int, int],
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    context_aspect: tuple[float, float] = (1.0, 1.0),
    min_keep: int = 10,
    tries: int = 20,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> PatchMask:
    """I-JEPA's blocks as a :class:`PatchMask`: MASKED = targets, VISIBLE = context less targets, THROWN = the rest.

    The union of the targets and the visible context differ in size from
    sample to sample; as I-JEPA's collator trims every mask to the batch's
    smallest, each sample keeps as many MASKED and as many VISIBLE cells as
    the batch's smallest draw and throws the rest. The reference keeps the
    first cells in raster order; we keep cells chosen at random (from the
    generator), so no side of a block is favoured. Reading the two minima is
    the draw's one device-to-host sync: the counts are data-dependent and a
    :class:`PatchMask` needs them as integers.

    Args:
        batch_size: ``B``.
        grid: ``(Gh, Gw)``.
        num_targets, target_scale, target_aspect, context_scale, context_aspect, min_keep, tries:
            see :func:`multiblock_cells`.
        generator: a ``torch.Generator`` on ``device``.
        device: where the mask lives.

    Returns:
        A :class:`PatchMask` with equal counts in every sample.

    Examples:
        >>> m = multiblock_patch_mask(8, (14, 14), generator=torch.Generator().manual_seed(0))
        >>> visible, masked, thrown = m.counts
        >>> m.masked.flatten(1).sum(1).tolist() == [masked] * 8, visible >= 10
        (True, True)
    """
    draw = multiblock_cells(
        batch_size,
        grid,
        num_targets,
        target_scale,
        target_aspect,
        context_scale,
        context_aspect,
        min_keep,
        tries,
        generator,
        device,
    )
    masked, visible = draw.masked.flatten(1), draw.visible.flatten(1)
    num_masked, num_visible = torch.stack([masked.sum(1).min(), visible.sum(1).min()]).tolist()
    if num_masked == 0 or num_visible == 0:
        raise ValueError(
            f"a {grid[0]}x{grid[1]} grid left a sample with {num_masked} target and {num_visible} visible cells; "
            "use a finer grid or smaller target blocks"
        )
    # masked and visible are disjoint: one draw ranks both.
    noise = torch.rand(masked.shape, generator=generator, device=device)
    keep_masked = top_cells(torch.where(masked, noise, -1.0), num_masked)
    keep_visible = top_cells(torch.where(visible, noise, -1.0), num_visible)
    states = torch.where(keep_masked, MASKED, torch.where(keep_visible, VISIBLE, THROWN)).to(torch.uint8)
    cells = grid[0] * grid[1]
    return PatchMask(states.view(batch_size, *grid), (num_visible, num_masked, cells - num_masked - num_visible))


@dataclass
class MultiBlockMaskOptions(MaskOptions):
    """``mask.name: multiblock``: I-JEPA's target blocks (count, share of the image, aspect), its
    context block's share, and the visible cells each sample needs."""

    num_targets: int = 4
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])
    target_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    min_keep: int = 10


def _small_options(patch_size: int, image_size: int) -> MultiBlockMaskOptions:
    cells = (image_size // patch_size) ** 2
    return MultiBlockMaskOptions(min_keep=max(1, min(10, cells // 8)))


@register_mask("multiblock", options=MultiBlockMaskOptions, emits="patch", small=_small_options)
class MultiBlockMask(PatchMaskStage):
    """I-JEPA's multi-block masking as a loader stage, for the masked-image objectives.

    Assran et al., "Self-Supervised Learning from Images with a
    Joint-Embedding Predictive Architecture", CVPR 2023: ``num_targets``
    target blocks (scale 0.15-0.2, aspect 0.75-1.5) and a square context
    block (scale 0.85-1.0) with the targets removed. In a :class:`PatchMask`
    the targets' union is MASKED, the context outside the targets VISIBLE and
    the rest THROWN, so MAE reconstructs the targets from the context and
    SimMIM predicts them with the rest of the image dropped. Counts are the
    batch's smallest, as I-JEPA's collator trims them (see
    :func:`multiblock_patch_mask`); one size per batch for each block kind,
    as the collator draws them (:func:`multiblock_cells`).

    Args:
        patch_size: the model's patch size in pixels.
        num_targets: target blocks per sample.
        target_scale: range of a target block's share of the image.
        target_aspect: range of a target block's height / width.
        context_scale: range of the context block's share of the image.
        min_keep: visible cells each sample needs (I-JEPA's ViT-H/14 setting: 10).
        tries: context positions drawn per sample before cells are given back.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = MultiBlockMask(patch_size=16)(Batch(images=torch.zeros(8, 3, 224, 224), seed=0))
        >>> out.mask.grid, sum(out.mask.counts), out.mask.num_masked > 0, out.mask.num_visible >= 10
        ((14, 14), 196, True, True)
    """

    def __init__(
        self,
        patch_size: int = 16,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        min_keep: int = 10,
        tries: int = 20,
    ) -> None:
        super().__init__(patch_size)
        checked = check_multiblock_args(
            num_targets, target_scale, target_aspect, context_scale, (1.0, 1.0), min_keep, tries
        )
        self.num_targets, self.target_scale, self.target_aspect, self.context_scale = checked[:4]
        self.min_keep, self.tries = checked[5:]

    @classmethod
    def from_options(cls, options: MultiBlockMaskOptions, context: MaskContext) -> MultiBlockMask:
        """The stage of the config's ``mask`` section (``options``) at ``context``'s patch and image size."""
        return cls(
            context.patch_size,
            options.num_targets,
            tuple(options.target_scale),
            tuple(options.target_aspect),
            tuple(options.context_scale),
            options.min_keep,
        )

    def sample(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator | None, device: torch.device
    ) -> PatchMask:
        grid = patch_grid(*image_size, self.patch_size)
        return multiblock_patch_mask(
            batch_size,
            grid,
            self.num_targets,
            self.target_scale,
            self.target_aspect,
            self.context_scale,
            (1.0, 1.0),
            self.min_keep,
            self.tries,
            generator,
            device,
        )

    def extra_repr(self) -> str:
        aspect = "" if self.target_aspect == (0.75, 1.5) else f", target_aspect={self.target_aspect}"
        return (
            f"patch_size={self.patch_size}, num_targets={self.num_targets}, target_scale={self.target_scale}"
            f"{aspect}, context_scale={self.context_scale}, min_keep={self.min_keep}"
        )
