"""Shared pieces of the mask generators: argument checks, grids, exact top-k selection."""

from __future__ import annotations

import math

import torch

__all__ = [
    "ceil_count",
    "check_mask_patch_size",
    "check_ratio",
    "cumulative_or",
    "mask_count",
    "patch_grid",
    "rank_cells",
    "top_cells",
]


def check_ratio(name: str, ratio: float, allow_zero: bool = True) -> float:
    """Return ``ratio`` if it lies in ``[0, 1)`` (``(0, 1)`` without ``allow_zero``), else raise."""
    ratio = float(ratio)
    low_ok = ratio >= 0 if allow_zero else ratio > 0
    if not (low_ok and ratio < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {ratio}")
    return ratio


def mask_count(num_cells: int, ratio: float) -> int:
    """``round(num_cells * ratio)``: the exact number of cells a ratio asks for."""
    return int(round(num_cells * ratio))


def ceil_count(num_cells: int, ratio: float) -> int:
    """``ceil(num_cells * ratio)``: SimMIM's count of masked cells (its reference code's ``np.ceil``).

    Our choice beyond the reference: a product that floating point puts a hair
    above an integer (``100 * 0.07 = 7.000000000000001``) counts as that
    integer (7, where ``np.ceil`` gives 8).

    Examples:
        >>> ceil_count(49, 0.6), ceil_count(49, 0.44), ceil_count(49, 0.26), ceil_count(100, 0.07)
        (30, 22, 13, 7)
    """
    return int(math.ceil(num_cells * ratio - 1e-9))


def patch_grid(height: int, width: int, patch_size: int, what: str = "patch_size") -> tuple[int, int]:
    """The ``(Gh, Gw)`` grid of ``patch_size`` patches over an image, or a ``ValueError``."""
    if patch_size < 1:
        raise ValueError(f"{what} must be positive, got {patch_size}")
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by {what}={patch_size}")
    return height // patch_size, width // patch_size


def check_mask_patch_size(mask_patch_size: int | None, patch_size: int, optional: bool = True) -> int | None:
    """Return ``mask_patch_size`` (SimMIM's coarse cell side in pixels) as an int if it is a positive multiple of
    ``patch_size``, ``None`` as is where ``optional`` (single patches), else raise naming both.

    Examples:
        >>> check_mask_patch_size(8, 4), check_mask_patch_size(None, 4)
        (8, None)
        >>> check_mask_patch_size(6, 4)
        Traceback (most recent call last):
        ...
        ValueError: mask_patch_size=6 must be a positive multiple of patch_size=4 (or None for single patches)
    """
    if mask_patch_size is None and optional:
        return None
    if mask_patch_size is None or mask_patch_size < 1 or mask_patch_size % patch_size:
        single = " (or None for single patches)" if optional else ""
        raise ValueError(
            f"mask_patch_size={mask_patch_size} must be a positive multiple of patch_size={patch_size}{single}"
        )
    return int(mask_patch_size)


def top_cells(scores: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """Mark the ``count`` highest-scoring cells of each row.

    Args:
        scores: ``(B, N)`` float scores; give them a random tie-break.
        count: cells to mark, one int for all rows or a ``(B,)`` tensor.

    Returns:
        ``(B, N)`` bool with exactly ``count`` (per row) ``True`` entries.
    """
    batch, cells = scores.shape
    if not isinstance(count, torch.Tensor):
        # One count for all rows: an unsorted top-k is several times cheaper than a sort.
        chosen = torch.zeros((batch, cells), dtype=torch.bool, device=scores.device)
        if count <= 0:
            return chosen
        return chosen.scatter_(1, torch.topk(scores, count, dim=1, sorted=False).indices, True)
    order = torch.argsort(scores, dim=1, descending=True)
    rank = torch.arange(cells, device=scores.device).expand(batch, cells)
    return torch.zeros((batch, cells), dtype=torch.bool, device=scores.device).scatter(
        1, order, rank < count.view(-1, 1)
    )


def cumulative_or(flags: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``out[..., r, ...] = flags[..., :r + 1, ...].any(dim)``: an inclusive OR scan.

    A log-step (Hillis-Steele) scan: ``ceil(log2 R)`` whole-tensor ORs,
    several times faster than ``cummax`` or ``cumsum`` on the CPU.
    """
    out = flags.transpose(0, dim)
    step = 1
    while step < out.shape[0]:
        out = torch.cat([out[:step], out[step:] | out[:-step]], dim=0)
        step *= 2
    return out.transpose(0, dim)


def rank_cells(scores: torch.Tensor, noise: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """The cell indices of each row of ``(B, N)`` ``scores``, highest first (``descending``), exact ties
    broken by the random order of ``noise`` (``(B, N)`` uniform draws): both sorts are stable.

    Examples:
        >>> import torch
        >>> rank_cells(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), torch.tensor([[0.1, 0.9, 0.2, 0.5]])).tolist()
        [[2, 1, 0, 3]]
    """
    order = noise.argsort(dim=1, stable=True)
    return order.gather(1, scores.gather(1, order).argsort(dim=1, descending=descending, stable=True))
