"""BEiT-style block masking, batched, with the exact count in every sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._mask_stage import PatchMaskStage
from ._sampling import check_ratio, cumulative_or, mask_count, patch_grid, top_cells
from .patch_mask import PatchMask

__all__ = ["BlockMask", "BlockDraw", "block_cells", "block_patch_mask"]


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
    if min_cells < 1:
        raise ValueError(f"min_cells must be at least 1, got {min_cells}")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"aspect must satisfy 0 < low <= high, got {tuple(aspect)}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
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
    cols = torch.arange(gw, device=device)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None]) & valid[..., None]  # (B, R, Gh)
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (B, R, Gw)
    blocks = (in_rows[..., :, None] & in_cols[..., None, :]).flatten(2)  # (B, R, N)
    # Union of the first r + 1 proposals, for every r at once; (B, R, N) bool.
    unions = cumulative_or(blocks, dim=1)
    sizes = unions.sum(2)  # (B, R), non-decreasing in r
    placed = (sizes <= target[:, None]).sum(1)  # proposals placed whole
    before = torch.cat([torch.zeros_like(unions[:, :1]), unions], dim=1)
    union = before.gather(1, placed.view(-1, 1, 1).expand(-1, 1, gh * gw)).squeeze(1)
    padded = torch.cat([blocks, torch.zeros_like(blocks[:, :1])], dim=1)
    partial = padded.gather(1, placed.view(-1, 1, 1).expand(-1, 1, gh * gw)).squeeze(1)
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
        if min_cells < 1:
            raise ValueError(f"min_cells must be at least 1, got {min_cells}")
        if not 0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must satisfy 0 < low <= high, got {tuple(aspect)}")
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.min_cells, self.aspect, self.rounds = int(min_cells), tuple(aspect), int(rounds)

    def sample(self, batch_size, image_size, generator, device) -> PatchMask:
        grid = patch_grid(*image_size, self.patch_size)
        return block_patch_mask(
            batch_size, grid, self.ratio, self.min_cells, self.aspect, generator, device, self.rounds
        )

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, patch_size={self.patch_size}, min_cells={self.min_cells}, aspect={self.aspect}"
