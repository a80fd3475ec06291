"""BEiT-style block masking, batched, with the exact count in every sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._mask_stage import PatchMaskStage
from ._sampling import check_ratio, cumulative_or, mask_count, patch_grid, top_cells
from .patch_mask import PatchMask
from .registry import MaskContext, MaskOptions, register_mask

__all__ = ["BlockMask", "BlockDraw", "BlockMaskOptions", "block_cells", "block_patch_mask"]


@dataclass(frozen=True)
class BlockDraw:
    """What :func:`block_cells` drew.

    Attributes:
        cells: ``(B, Gh, Gw)`` bool, exactly ``count`` True cells per sample.
        blocks: ``(B, R, 4)`` int64 ``(top, left, height, width)`` proposed per round.
        accepted: ``(B, R)`` bool, the proposals that were placed.
        from_blocks: ``(B,)`` cells that lie in a placed or partly placed block
            (the rest are the random top-up).
    """

    cells: torch.Tensor
    blocks: torch.Tensor
    accepted: torch.Tensor
    from_blocks: torch.Tensor


_MAX_BIT_WIDTH = 62


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each non-negative int64 (SWAR, no multiplication overflow)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def _select(stack: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``stack[b, index[b]]`` for a ``(B, R, ...)`` stack, with index ``R`` meaning all zeros."""
    padded = torch.cat([stack, torch.zeros_like(stack[:, :1])], dim=1)
    shape = (-1, 1, *stack.shape[2:])
    return padded.gather(1, index.view(-1, *([1] * (stack.ndim - 1))).expand(shape)).squeeze(1)


def _place(blocks: torch.Tensor, sizes_of, target: torch.Tensor):
    """Place proposals in order while the union stays within ``target``.

    Returns the union of the placed proposals, the first proposal that would
    overshoot (all zeros if none), and how many were placed.
    """
    unions = cumulative_or(blocks, dim=1)
    placed = (sizes_of(unions) <= target[:, None]).sum(1)
    before = torch.cat([torch.zeros_like(unions[:, :1]), unions], dim=1)
    return _select(before, placed), _select(blocks, placed), placed


def _place_as_bits(in_rows, left, w, target, gw):
    """Grids up to 62 cells wide: each block row is a bit field in one int64."""
    span = (torch.ones_like(w) << w) - 1
    row_bits = torch.where(in_rows, (span << left)[..., None], torch.zeros_like(in_rows, dtype=torch.long))
    union, partial, placed = _place(row_bits, lambda u: _popcount(u).sum(-1), target)
    bits = torch.arange(gw, device=row_bits.device)

    def unpack(rows: torch.Tensor) -> torch.Tensor:  # (B, Gh) bit fields -> (B, Gh * Gw) bool
        return ((rows[..., None] >> bits) & 1).flatten(1).bool()

    return unpack(union), unpack(partial), placed


def _place_as_bools(in_rows, left, w, target, gw):
    """Wider grids: blocks as ``(B, R, N)`` bools."""
    cols = torch.arange(gw, device=in_rows.device)
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])
    blocks = (in_rows[..., :, None] & in_cols[..., None, :]).flatten(2)
    union, partial, placed = _place(blocks, lambda u: u.sum(-1), target)
    return union, partial, placed


def check_block_args(min_cells: int, aspect: tuple[float, float], rounds: int) -> None:
    """Raise ``ValueError`` naming the value if block-sampling arguments are out of range."""
    if min_cells < 1:
        raise ValueError(f"min_cells must be at least 1, got {min_cells}")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"aspect must satisfy 0 < low <= high, got {tuple(aspect)}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")


def block_cells(
    batch_size: int,
    grid: tuple[int, int],
    count: int | torch.Tensor,
    min_cells: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    rounds: int = 16,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> BlockDraw:
    """Cover exactly ``count`` cells of each sample with random rectangles.

    After BEiT's block masking (Bao et al., "BEiT: BERT Pre-Training of Image
    Transformers", 2022): rectangles with area uniform in
    ``[min_cells, max(min_cells, count)]`` and aspect (height / width)
    log-uniform in ``aspect``. Our batched reading, beyond the paper: every
    sample proposes ``rounds`` rectangles at once (proposals whose rounded
    sides leave ``min_cells`` or ``aspect`` are dropped); they are placed in
    order while their union stays within ``count`` (a cumulative OR over the
    proposals, one op for the whole batch); the first rectangle that would
    overshoot is placed in part, and only if even that leaves the count short
    are random cells added. So the count is always exact (BEiT's loop can stop
    short), and the draw has no per-sample loop and no device sync.

    Args:
        batch_size: ``B``.
        grid: ``(Gh, Gw)``.
        count: cells to cover, one int or a ``(B,)`` tensor.
        min_cells: smallest block area.
        aspect: range of block height / width.
        rounds: rectangles proposed per sample.
        generator: a ``torch.Generator`` on ``device``.
        device: where to draw.

    Returns:
        A :class:`BlockDraw`.
    """
    gh, gw = grid
    check_block_args(min_cells, aspect, rounds)
    target = torch.as_tensor(count, device=device).expand(batch_size).long()
    u = torch.rand((batch_size, rounds, 4), generator=generator, device=device)
    high = target.clamp(min=min_cells).float().view(-1, 1)
    area = min_cells + u[..., 0] * (high - min_cells)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    h = torch.round(torch.sqrt(area * ratio)).long()
    w = torch.round(torch.sqrt(area / ratio)).long()
    valid = (h >= 1) & (w >= 1) & (h <= gh) & (w <= gw) & (h * w >= min_cells)
    valid &= (h >= aspect[0] * w) & (h <= aspect[1] * w)
    top = torch.floor(u[..., 2] * (gh - h + 1).clamp(min=1)).long()
    left = torch.floor(u[..., 3] * (gw - w + 1).clamp(min=1)).long()
    rows = torch.arange(gh, device=device)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None]) & valid[..., None]  # (B, R, Gh)
    place = _place_as_bits if gw <= _MAX_BIT_WIDTH else _place_as_bools
    union, partial, placed = place(in_rows, left, w, target, gw)  # (B, N), (B, N), (B,)
    # Placed cells first, then the overshooting block's, then any cell; random within each.
    noise = torch.rand((batch_size, gh * gw), generator=generator, device=device)
    scores = union.float() * 4 + partial.float() * 2 + noise
    cells = top_cells(scores, count if isinstance(count, int) else target).view(batch_size, gh, gw)
    accepted = torch.arange(rounds, device=device) < placed[:, None]
    return BlockDraw(
        cells=cells,
        blocks=torch.stack([top, left, h, w], dim=2),
        accepted=accepted & valid,
        from_blocks=(cells.flatten(1) & (union | partial)).sum(1),
    )


def block_patch_mask(
    batch_size: int,
    grid: tuple[int, int],
    ratio: float = 0.4,
    min_cells: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    rounds: int = 16,
) -> PatchMask:
    """A :class:`PatchMask` with ``round(N * ratio)`` MASKED cells placed in blocks (see :func:`block_cells`)."""
    check_ratio("ratio", ratio)
    count = mask_count(grid[0] * grid[1], ratio)
    draw = block_cells(batch_size, grid, count, min_cells, aspect, rounds, generator, device)
    return PatchMask.from_masked(draw.cells, count)


@dataclass
class BlockMaskOptions(MaskOptions):
    """``mask.name: block``: the fraction of patches masked, in blocks."""

    ratio: float = 0.75


@register_mask(
    "block", options=BlockMaskOptions, emits="patch", small=lambda patch_size, image_size: BlockMaskOptions(ratio=0.4)
)
class BlockMask(PatchMaskStage):
    """BEiT-style block masking as a loader stage, exact count in every sample.

    Args:
        ratio: fraction of patches masked (BEiT: 0.4).
        patch_size: the model's patch size in pixels.
        min_cells: smallest block, in cells.
        aspect: range of block height / width.
        rounds: rectangles proposed per sample.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = BlockMask(0.4, patch_size=16)(Batch(images=torch.zeros(8, 3, 224, 224), seed=0))
        >>> out.mask.counts
        (118, 78, 0)
    """

    def __init__(
        self,
        ratio: float = 0.4,
        patch_size: int = 16,
        min_cells: int = 4,
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
        rounds: int = 16,
    ) -> None:
        super().__init__(patch_size)
        self.ratio = check_ratio("ratio", ratio)
        check_block_args(min_cells, aspect, rounds)
        self.min_cells, self.aspect, self.rounds = int(min_cells), tuple(aspect), int(rounds)

    @classmethod
    def from_options(cls, options: BlockMaskOptions, context: MaskContext) -> BlockMask:
        """The stage of the config's ``mask`` section (``options``) at ``context``'s patch and image size."""
        return cls(options.ratio, context.patch_size)

    def sample(
        self, batch_size: int, image_size: tuple[int, int], generator: torch.Generator | None, device: torch.device
    ) -> PatchMask:
        grid = patch_grid(*image_size, self.patch_size)
        return block_patch_mask(
            batch_size, grid, self.ratio, self.min_cells, self.aspect, generator, device, self.rounds
        )

    def extra_repr(self) -> str:
        aspect = f"({self.aspect[0]:.3g}, {self.aspect[1]:.3g})"
        return f"ratio={self.ratio}, patch_size={self.patch_size}, min_cells={self.min_cells}, aspect={aspect}"
