"""The one container that flows between loader stages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Batch"]


def _move(value: Any, device: torch.device | str, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if hasattr(value, "to") and callable(value.to) and not isinstance(value, type):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _move(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device, non_blocking) for v in value)
    return value


@dataclass(frozen=True)
class Batch:
    """A batch of images and everything stages add to it.

    Stages never mutate a ``Batch``: they return a new one with
    :meth:`replace`, sharing the tensors they did not touch.

    Args:
        images: ``(B, C, H, W)`` float images in ``[0, 1]`` (or normalised).
        labels: ``(B,)`` integer class labels, or ``None`` for unlabelled data.
        index: ``(B,)`` int64 position of each sample in its dataset; indexes
            per-sample caches such as AMT's saliency maps.
        crops: ``(B, 4)`` float boxes ``(x0, y0, x1, y1)`` that ``images`` were
            cropped from, in pixel coordinates of the decoded source image
            (``x1``/``y1`` exclusive).
        flips: ``(B,)`` bool, ``True`` where the crop was flipped left-right
            after cropping.
        source_sizes: ``(B, 2)`` int ``(H, W)`` of each source image the boxes refer to.
        views: extra augmented views, each ``(B, C, H, W)``.
        view_crops: ``(B, 4)`` boxes for each view, same convention as ``crops``.
        view_flips: ``(B,)`` flips for each view.
        mask: the patch mask of this batch (a ``masklab.transforms.PatchMask``).
        mix: what a mixing stage emits (mixed view, lambda, partner ...).
        extras: room for stages that add something not named above.
        seed: the integer that seeds this batch's stage randomness, derived
            by the loader from ``(seed, epoch, step, rank)``. ``None`` means
            stages draw from torch's global generator.

    Shape:
        ``B`` is ``images.shape[0]``; every per-sample tensor shares it.

    Examples:
        >>> import torch
        >>> b = Batch(images=torch.zeros(2, 3, 8, 8), labels=torch.tensor([0, 1]))
        >>> len(b), b.device.type
        (2, 'cpu')
        >>> b2 = b.replace(labels=torch.tensor([1, 0]))
        >>> b.labels.tolist(), b2.labels.tolist()
        ([0, 1], [1, 0])
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    index: torch.Tensor | None = None
    crops: torch.Tensor | None = None
    flips: torch.Tensor | None = None
    source_sizes: torch.Tensor | None = None
    views: list[torch.Tensor] | None = None
    view_crops: list[torch.Tensor] | None = None
    view_flips: list[torch.Tensor] | None = None
    mask: Any = None
    mix: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            shape = tuple(self.images.shape) if isinstance(self.images, torch.Tensor) else type(self.images)
            raise ValueError(f"Batch.images must be a (B, C, H, W) tensor, got {shape}")
        n = self.images.shape[0]
        for name in ("labels", "index", "crops", "flips", "source_sizes"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(
                    f"Batch.{name} has {value.shape[0]} rows but images has {n} (shape {tuple(value.shape)})"
                )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        """The device of ``images``; stages draw their randomness here."""
        return self.images.device

    def replace(self, **changes: Any) -> Batch:
        """A new batch with ``changes`` applied; tensors not named are shared."""
        return dataclasses.replace(self, **changes)

    def with_extras(self, **extras: Any) -> Batch:
        """A new batch whose ``extras`` also hold ``extras``."""
        return self.replace(extras={**self.extras, **extras})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor (and every object with a ``.to``) to ``device``."""
        changes = {
            f.name: _move(getattr(self, f.name), device, non_blocking)
            for f in dataclasses.fields(self)
            if f.name != "seed"
        }
        return dataclasses.replace(self, **changes)
