"""Abilities a stage may have beyond ``forward``, declared once, so the training loop asks ``isinstance``.

A stage takes part in training through these and nothing else: the loop
binds the guide of a :class:`GuidedStage`, tells a :class:`ProgressAware`
stage where training is, and refreshes a :class:`RefreshesCache` stage when
it is due. A stage has an ability by having its methods (structural typing);
it need not inherit from anything here.

Examples:
    >>> from masklab.transforms import AttentionMask, HierarchicalMask, RandomMask
    >>> amt, ehm = AttentionMask(num_samples=4, patch_size=8), HierarchicalMask(patch_size=8)
    >>> [isinstance(amt, GuidedStage), isinstance(amt, ProgressAware), isinstance(amt, RefreshesCache)]
    [True, False, True]
    >>> [isinstance(ehm, GuidedStage), isinstance(ehm, ProgressAware), isinstance(ehm, RefreshesCache)]
    [True, True, False]
    >>> isinstance(RandomMask(0.75, patch_size=8), (GuidedStage, ProgressAware, RefreshesCache))
    False
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Gather", "Guide", "GuidedStage", "ProgressAware", "RefreshesCache"]

Guide = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
"""A model's view of images for a stage: ``guide(images (B, C, H, W), grid) -> maps``."""

Gather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(index, maps) -> (index, maps)`` of every rank, for a cache each rank fills in part."""


@runtime_checkable
class GuidedStage(Protocol):
    """A stage that reads a model (AMT's saliency, EHM's affinity, HPM's difficulty); the loop binds the
    objective's guide.

    Attributes:
        guide_kind: the guidance it needs, as objectives name it (one of ``masklab.transforms.registry.GUIDES``).
    """

    guide_kind: str

    def bind(self, guide: Guide) -> None:
        """Use ``guide`` from now on; stages never import a model."""


@runtime_checkable
class ProgressAware(Protocol):
    """A stage that evolves with training (EHM's hierarchy level, HPM's share of hard cells)."""

    def set_progress(self, progress: float) -> None:
        """Where training is, in [0, 1]."""


@runtime_checkable
class RefreshesCache(Protocol):
    """A stage with a per-sample cache recomputed from the model now and then (AMT's saliency)."""

    def refresh_due(self, epoch: int, epochs: int) -> bool:
        """Whether the cache is recomputed at the start of ``epoch`` of ``epochs``."""

    def refresh(self, batches: Iterable, grid: tuple[int, int], gather: Gather | None = None) -> None:
        """Recompute the cache from uncropped ``batches``; ``gather`` collects every rank's part."""
