"""The one patch-mask type every mask stage emits and every objective consumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import repeat

__all__ = ["VISIBLE", "MASKED", "THROWN", "PatchMask"]

VISIBLE = 0
"""Cell fed to the encoder."""
MASKED = 1
"""Cell hidden from the encoder; predicted or reconstructed."""
THROWN = 2
"""Cell dropped from encoder, decoder and loss (AMT's throwing)."""

_STATE_NAMES = ("visible", "masked", "thrown")


class PatchMask:
    """A per-sample patch-grid mask with three states, equal counts in every sample.

    ``states`` is a ``(B, Gh, Gw)`` uint8 grid of :data:`VISIBLE`,
    :data:`MASKED` and :data:`THROWN`. Every sample has the same number of
    cells in each state, so tokens gather into dense ``(B, n, D)`` tensors.

    The gather indices come from one stable sort of the flattened grid by
    state: ``ids_shuffle`` lists the visible cells, then the masked, then the
    thrown, each group in ascending cell order. ``ids_restore`` inverts it.

    Args:
        states: ``(B, Gh, Gw)`` integer tensor of states.
        counts: ``(visible, masked, thrown)`` when the caller knows them (mask
            stages do); then ``states`` is trusted, with no device sync. When
            ``None`` they are counted and checked, which syncs.

    Raises:
        ValueError: unknown states, or counts that differ between samples.

    Examples:
        >>> import torch
        >>> m = PatchMask(torch.tensor([[[0, 1], [2, 0]], [[1, 0], [0, 2]]]))
        >>> m.counts
        (2, 1, 1)
        >>> m.ids_keep.tolist(), m.ids_masked.tolist()
        ([[0, 3], [1, 2]], [[1], [0]])
    """

    def __init__(self, states: torch.Tensor, counts: Sequence[int] | None = None) -> None:
        if states.ndim != 3:
            raise ValueError(f"PatchMask states must be (B, Gh, Gw), got shape {tuple(states.shape)}")
        if states.is_floating_point() or states.is_complex():
            raise ValueError(f"PatchMask states must be an integer tensor, got {states.dtype}")
        self.states = states.to(torch.uint8)
        if counts is None:
            counts = self._count_and_check()
        counts = tuple(int(c) for c in counts)
        if len(counts) != 3 or sum(counts) != self.num_cells or min(counts) < 0:
            raise ValueError(f"counts {counts} do not add up to the {self.num_cells} cells of a {self.grid} grid")
        self.counts: tuple[int, int, int] = counts  # (visible, masked, thrown)
        self._ids_shuffle: torch.Tensor | None = None

    def _count_and_check(self) -> tuple[int, int, int]:
        flat = self.states.flatten(1).long()
        if flat.numel() and int(flat.max()) > THROWN:
            raise ValueError(f"PatchMask states must be 0 (visible), 1 (masked) or 2 (thrown), got {int(flat.max())}")
        per_sample = torch.stack([(flat == s).sum(1) for s in (VISIBLE, MASKED, THROWN)], dim=1)
        if per_sample.shape[0] and not bool((per_sample == per_sample[:1]).all()):
            bad = int((per_sample != per_sample[:1]).any(1).nonzero()[0])
            raise ValueError(
                "every sample of a PatchMask needs the same count of each state; sample 0 has "
                f"(visible, masked, thrown) = {tuple(per_sample[0].tolist())}, sample {bad} has {tuple(per_sample[bad].tolist())}"
            )
        return tuple(per_sample[0].tolist()) if per_sample.shape[0] else (self.num_cells, 0, 0)

    @classmethod
    def from_masked(cls, masked: torch.Tensor, count: int | None = None) -> PatchMask:
        """A VISIBLE/MASKED mask from a ``(B, Gh, Gw)`` bool grid (``True`` = masked)."""
        counts = None if count is None else (masked[0].numel() - count, count, 0)
        return cls(masked.to(torch.uint8) * MASKED, counts)

    @classmethod
    def all_visible(cls, batch_size: int, grid: tuple[int, int], device: torch.device | str | None = None) -> PatchMask:
        """Every cell VISIBLE: ``ids_keep`` is the cells in grid order (a whole image through
        ``encode_visible``, as HPM's difficulty and I-JEPA's target encoder read it).

        Examples:
            >>> PatchMask.all_visible(2, (3, 4)).counts
            (12, 0, 0)
        """
        states = torch.full((batch_size, *grid), VISIBLE, dtype=torch.uint8, device=device)
        return cls(states, (grid[0] * grid[1], 0, 0))

    # -- shape -------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """``(Gh, Gw)``."""
        return int(self.states.shape[1]), int(self.states.shape[2])

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def batch_size(self) -> int:
        return int(self.states.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    @property
    def device(self) -> torch.device:
        return self.states.device

    @property
    def num_visible(self) -> int:
        return self.counts[VISIBLE]

    @property
    def num_masked(self) -> int:
        return self.counts[MASKED]

    @property
    def num_thrown(self) -> int:
        return self.counts[THROWN]

    # -- boolean views ------------------------------------------------------
    @property
    def visible(self) -> torch.Tensor:
        """``(B, Gh, Gw)`` bool."""
        return self.states == VISIBLE

    @property
    def masked(self) -> torch.Tensor:
        """``(B, Gh, Gw)`` bool."""
        return self.states == MASKED

    @property
    def thrown(self) -> torch.Tensor:
        """``(B, Gh, Gw)`` bool."""
        return self.states == THROWN

    # -- gather indices -----------------------------------------------------
    @property
    def ids_shuffle(self) -> torch.Tensor:
        """``(B, N)`` int64: visible cells, then masked, then thrown (ascending within each)."""
        if self._ids_shuffle is None:
            self._ids_shuffle = torch.argsort(self.states.flatten(1), dim=1, stable=True)
        return self._ids_shuffle

    @property
    def ids_keep(self) -> torch.Tensor:
        """``(B, n_visible)`` flat indices of the VISIBLE cells."""
        return self.ids_shuffle[:, : self.num_visible]

    @property
    def ids_masked(self) -> torch.Tensor:
        """``(B, n_masked)`` flat indices of the MASKED cells."""
        return self.ids_shuffle[:, self.num_visible : self.num_visible + self.num_masked]

    @property
    def ids_thrown(self) -> torch.Tensor:
        """``(B, n_thrown)`` flat indices of the THROWN cells."""
        return self.ids_shuffle[:, self.num_visible + self.num_masked :]

    @property
    def ids_restore(self) -> torch.Tensor:
        """``(B, N)``: position of each cell in :attr:`ids_shuffle` (its inverse permutation)."""
        return torch.argsort(self.ids_shuffle, dim=1)

    # -- resolution changes ---------------------------------------------------
    def to_pixels(self, height: int, width: int) -> torch.Tensor:
        """``(B, H, W)`` uint8 states, each cell repeated over its ``H/Gh x W/Gw`` pixels."""
        gh, gw = self.grid
        if height % gh or width % gw:
            raise ValueError(f"image size {height}x{width} is not divisible by the {gh}x{gw} mask grid")
        return repeat(self.states, "b h w -> b (h p) (w q)", p=height // gh, q=width // gw)

    def regrid(self, height: int, width: int) -> PatchMask:
        """The same mask on a ``height x width`` grid.

        A finer grid (an integer multiple) repeats each cell over its children.
        A coarser grid (an integer divisor) needs every block of children to
        share one state, else the counts could not stay exact.
        """
        gh, gw = self.grid
        if height % gh == 0 and width % gw == 0:
            p, q = height // gh, width // gw
            states = repeat(self.states, "b h w -> b (h p) (w q)", p=p, q=q)
            return PatchMask(states, tuple(c * p * q for c in self.counts))
        if gh % height == 0 and gw % width == 0:
            p, q = gh // height, gw // width
            blocks = self.states.view(self.batch_size, height, p, width, q)
            first = blocks[:, :, :1, :, :1]
            if not bool((blocks == first).all()):
                raise ValueError(f"cannot regrid {gh}x{gw} to {height}x{width}: some {p}x{q} blocks mix states")
            return PatchMask(first[:, :, 0, :, 0].contiguous(), tuple(c // (p * q) for c in self.counts))
        raise ValueError(f"cannot regrid a {gh}x{gw} mask to {height}x{width}: neither divides the other")

    def to(self, device: torch.device | str) -> PatchMask:
        """This mask on ``device`` (its counts unchanged)."""
        moved = PatchMask(self.states.to(device), self.counts)
        if self._ids_shuffle is not None:
            moved._ids_shuffle = self._ids_shuffle.to(device)
        return moved

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={c}" for name, c in zip(_STATE_NAMES, self.counts, strict=True))
        return f"PatchMask(batch={self.batch_size}, grid={self.grid}, {counts}, device={self.device})"
