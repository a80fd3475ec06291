"""Nested masks for multi-stage feature maps (MaskDeep)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from einops import repeat

from masklab.pipeline import Batch, Stage

from ._sampling import check_ratio, mask_count, patch_grid, top_cells
from .registry import MaskContext, MaskOptions, register_mask

__all__ = ["FeatureMask", "FeatureMaskOptions", "FeatureMasks", "check_groups", "feature_masks", "feature_strides"]


@dataclass(frozen=True)
class FeatureMasks:
    """Masks for the feature maps of several stages, ``G`` groups per image.

    Attributes:
        strides: the stages' strides in pixels, finest first.
        masks: one ``(B, G, H / s, W / s)`` bool tensor per stride, ``True`` = masked.
            A masked cell of a coarse stage masks all its children in finer stages.
    """

    strides: tuple[int, ...]
    masks: tuple[torch.Tensor, ...]

    @property
    def groups(self) -> int:
        return int(self.masks[0].shape[1])

    def __getitem__(self, stride: int) -> torch.Tensor:
        return self.masks[self.strides.index(stride)]

    def to(self, device: torch.device | str) -> FeatureMasks:
        """These masks on ``device``."""
        return FeatureMasks(self.strides, tuple(m.to(device) for m in self.masks))


def feature_strides(strides: Sequence[int]) -> tuple[int, ...]:
    """``strides`` sorted, finest first; raises unless they are positive and each divides the next."""
    ordered = tuple(sorted(int(s) for s in strides))
    if not ordered or ordered[0] < 1:
        raise ValueError(f"strides must be positive, got {tuple(strides)}")
    for fine, coarse in zip(ordered, ordered[1:], strict=False):
        if coarse % fine:
            raise ValueError(f"each stride must divide the next, got {ordered}")
    return ordered


def check_groups(groups: int) -> int:
    """``groups`` if it is at least 1, else a ``ValueError``."""
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    return int(groups)


def feature_masks(
    batch_size: int,
    image_size: tuple[int, int],
    strides: Sequence[int] = (8, 16, 32),
    ratio: float = 0.5,
    groups: int = 4,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> FeatureMasks:
    """Draw ``groups`` nested random masks per image over the stages' feature grids.

    Our reading of MaskDeep (Liu et al., arXiv 2304.00218, abstract only): random masks on
    the coarsest stage's grid, exactly ``round(n * ratio)`` cells per group,
    repeated down to every finer stage, so a masked coarse cell masks its
    ``(s / s')^2`` children and every stage masks the same image regions.

    Args:
        batch_size: ``B``.
        image_size: ``(H, W)``, multiples of the largest stride.
        strides: stage strides in pixels, each dividing the next (e.g. C3/C4/C5 of a ResNet).
        ratio: fraction of cells masked in every stage.
        groups: ``G`` independent masks per image.
        generator: a ``torch.Generator`` on ``device``.
        device: where to draw.
    """
    strides = feature_strides(strides)
    check_ratio("ratio", ratio)
    check_groups(groups)
    gh, gw = patch_grid(*image_size, strides[-1], what="the largest stride")
    count = mask_count(gh * gw, ratio)
    scores = torch.rand((batch_size * groups, gh * gw), generator=generator, device=device)
    coarse = top_cells(scores, count).view(batch_size, groups, gh, gw)
    masks = tuple(repeat(coarse, "b g h w -> b g (h p) (w q)", p=strides[-1] // s, q=strides[-1] // s) for s in strides)
    return FeatureMasks(strides, masks)


@dataclass
class FeatureMaskOptions(MaskOptions):
    """``mask.name: feature`` (MaskDeep): the fraction of cells masked, the masked stages' strides in
    pixels, and the masks per image."""

    ratio: float = 0.75
    strides: list[int] = field(default_factory=lambda: [8, 16, 32])
    groups: int = 4


def _small_feature_options(patch_size: int, image_size: int) -> FeatureMaskOptions:
    coarse = max(4, image_size // 2)  # a 2x2 grid on the coarsest stage
    return FeatureMaskOptions(ratio=0.5, strides=[coarse // 4, coarse // 2, coarse], groups=2)


@register_mask("feature", options=FeatureMaskOptions, emits="feature", small=_small_feature_options)
class FeatureMask(Stage):
    """Nested feature-map masks for MaskDeep, put in ``batch.extras["feature_masks"]``.

    The masks are drawn for the batch's image size; the objective applies them
    to the backbone's feature maps (the stage never sees a model). When the
    batch has views (put :class:`~masklab.transforms.Views` first), each view
    gets its own draw too, in ``batch.extras["view_feature_masks"]`` (a tuple,
    one :class:`FeatureMasks` per view, for the views' size).

    Args:
        strides: the backbone stages' strides in pixels.
        ratio: fraction of cells masked in every stage.
        groups: independent masks per image.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> out = FeatureMask(strides=(8, 16, 32), ratio=0.5, groups=4)(Batch(images=torch.zeros(2, 3, 64, 64), seed=0))
        >>> [tuple(m.shape) for m in out.extras["feature_masks"].masks]
        [(2, 4, 8, 8), (2, 4, 4, 4), (2, 4, 2, 2)]
    """

    key = "feature_masks"
    view_key = "view_feature_masks"

    def __init__(self, strides: Sequence[int] = (8, 16, 32), ratio: float = 0.5, groups: int = 4) -> None:
        super().__init__()
        self.strides = feature_strides(strides)
        self.ratio = check_ratio("ratio", ratio)
        self.groups = check_groups(groups)

    @classmethod
    def from_options(cls, options: FeatureMaskOptions, context: MaskContext) -> FeatureMask:
        """The stage of the config's ``mask`` section (``options``) at ``context``'s patch and image size."""
        return cls(options.strides, options.ratio, options.groups)

    def make_params(
        self, batch: Batch, generator: torch.Generator | None
    ) -> tuple[FeatureMasks, tuple[FeatureMasks, ...]]:
        def draw(images: torch.Tensor) -> FeatureMasks:
            size = tuple(images.shape[-2:])
            return feature_masks(len(batch), size, self.strides, self.ratio, self.groups, generator, batch.device)

        return draw(batch.images), tuple(draw(view) for view in batch.views or ())

    def apply(self, batch: Batch, params: tuple[FeatureMasks, tuple[FeatureMasks, ...]]) -> Batch:
        masks, view_masks = params
        extras = {self.key: masks}
        if view_masks:
            extras[self.view_key] = view_masks
        return batch.with_extras(**extras)

    def extra_repr(self) -> str:
        return f"strides={self.strides}, ratio={self.ratio}, groups={self.groups}"
