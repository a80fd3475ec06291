"""MaskDeep: masked hierarchical features predict an EMA teacher's embeddings of the other view."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from masklab.pipeline import Batch
from masklab.transforms import FeatureMask, FeatureMaskOptions, FeatureMasks, check_groups, feature_strides

from ._common import GuidanceMixin, ObjectiveOutput, two_views
from .backbones import CNNBackbone, ViTBackbone
from .compat import check_family
from .ema import EMATeacher
from .heads import HeadOptions, predictor_mlp, projection_mlp
from .registry import register_objective

__all__ = ["TARGETS", "MaskDeep", "MaskDeepOptions", "maskdeep_loss", "masked_pool"]

TARGETS = ("global", "multi")
"""``global``: the teacher's fused embedding only; ``multi``: that and one embedding per stage."""


def masked_pool(features: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean of each group's VISIBLE cells: ``(B, C, H, W)`` features, ``(B, G, H, W)`` masks -> ``(B, G, C)``.

    Masked cells are weighted by exactly zero, so their values never reach
    the result. A group with no visible cell pools to zeros.

    Examples:
        >>> import torch
        >>> f = torch.arange(4.0).view(1, 1, 2, 2)
        >>> masked_pool(f, torch.tensor([[[[True, False], [False, True]]]])).tolist()
        [[[1.5]]]
    """
    if features.ndim != 4 or masked.ndim != 4 or features.shape[0] != masked.shape[0]:
        raise ValueError(f"features (B, C, H, W) {tuple(features.shape)} and masks (B, G, H, W) {tuple(masked.shape)}")
    if features.shape[-2:] != masked.shape[-2:]:
        raise ValueError(f"features are {tuple(features.shape[-2:])} but the masks {tuple(masked.shape[-2:])}")
    visible = (~masked).to(features.dtype)
    total = torch.einsum("bghw,bchw->bgc", visible, features)
    return total / visible.sum(dim=(2, 3)).clamp(min=1).unsqueeze(-1)


def maskdeep_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative cosine over targets x samples x groups, targets under stop-gradient.

    Args:
        predictions: ``(T, B, G, D)``: for each of ``T`` targets, every group's prediction.
        targets: ``(T, B, D)``: the teacher's embeddings.

    Returns:
        A scalar in ``[-1, 1]``.
    """
    if predictions.ndim != 4 or targets.ndim != 3 or predictions.shape[:2] + predictions.shape[3:] != targets.shape:
        raise ValueError(
            f"predictions (T, B, G, D) {tuple(predictions.shape)} do not match targets (T, B, D) {tuple(targets.shape)}"
        )
    return -F.cosine_similarity(predictions, targets.detach().unsqueeze(2), dim=-1).mean()


@dataclass
class MaskDeepOptions(HeadOptions):
    """``objective.name: maskdeep``: the heads and the teacher (:class:`HeadOptions`; ``None``:
    :class:`MaskDeep`'s defaults) and the targets (``multi`` | ``global``).

    The masked stages and the groups are the ``feature`` mask's options (``mask.strides``, ``mask.groups``).
    """

    targets: str = "multi"


@register_objective(
    "maskdeep",
    options=MaskDeepOptions,
    takes="feature",
    families=("cnn", "vit"),
    views=2,
    small=lambda: MaskDeepOptions(proj_hidden=64, proj_dim=32, pred_hidden=64),
)
class MaskDeep(GuidanceMixin, nn.Module):
    """MaskDeep (Liu et al., "Mask Hierarchical Features For Self-Supervised Learning", arXiv 2304.00218), our reading of the abstract.

    Each view runs through the encoder **once**; the :class:`FeatureMask`
    stage's nested masks hide cells of the chosen stages' feature maps, and
    for each of the ``G`` groups the visible cells of every stage are pooled
    (:func:`masked_pool`), fused (concatenated), projected and passed through
    a predictor. The targets are an EMA teacher's embeddings of the *other*
    view, unmasked: the fused global embedding, and with ``targets="multi"``
    one embedding per stage too (each stage has its own projector and
    predictor). The loss is :func:`maskdeep_loss`, averaged over the two
    directions (view 1 predicts view 2's targets and back): the scale of
    every negative-cosine loss here (SimSiam's, in ``[-1, 1]``; see
    :mod:`~masklab.objectives.negative_cosine`). Only the light heads scale
    with ``G``.

    Our choices where the abstract is silent: fusion by concatenation of the
    per-stage pooled features; BYOL's heads (projector 4096-256 with BN,
    predictor 4096) and EMA (0.99 -> 1, cosine); the teacher follows the
    backbone and the projectors. ViTs give their stages as the tokens of
    evenly spaced blocks (after the final norm) on the patch grid, average
    pooled to each stride.

    Args:
        backbone: a :class:`CNNBackbone` (``features_only``; ResNet-50 in the paper) or a :class:`ViTBackbone`.
        strides: the stages, by stride in pixels (CNN: some of ``backbone.strides``; ViT: multiples of the patch).
        groups: masks per image; the batch's masks must have this many (see :meth:`mask_stage`).
        targets: ``"multi"`` or ``"global"``.
        hidden: projector hidden width.
        dim: embedding width.
        pred_hidden: predictor hidden width.
        momentum: the teacher's EMA decay at the start.
        momentum_final: the decay at the end (cosine in between).

    Examples:
        >>> import torch
        >>> from masklab.objectives import CNNBackbone
        >>> from masklab.transforms import Views
        >>> _ = torch.manual_seed(0)
        >>> model = MaskDeep(CNNBackbone.from_name("resnet18"), strides=(8, 16, 32), groups=2, hidden=32, dim=16)
        >>> stages = [Views(2, "byol"), model.mask_stage(ratio=0.5)]
        >>> batch = Batch(images=torch.rand(4, 3, 64, 64), seed=0)
        >>> for stage in stages:
        ...     batch = stage(batch)
        >>> out = model(batch)
        >>> out.loss.ndim, sorted(out.logs)
        (0, ['loss', 'targets'])
    """

    name = "maskdeep"

    def __init__(
        self,
        backbone: CNNBackbone | ViTBackbone,
        strides: Sequence[int] = (8, 16, 32),
        groups: int = 4,
        targets: str = "multi",
        hidden: int = 4096,
        dim: int = 256,
        pred_hidden: int = 4096,
        momentum: float = 0.99,
        momentum_final: float = 1.0,
    ) -> None:
        super().__init__()
        check_family(self.name, backbone)
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
        self.strides, self.groups, self.targets = feature_strides(strides), check_groups(groups), targets
        self.backbone = backbone
        channels = self._channels(backbone)
        heads = {"global": sum(channels)}
        if targets == "multi":
            heads.update({f"stride{s}": c for s, c in zip(self.strides, channels, strict=True)})
        self.projectors = nn.ModuleDict({k: projection_mlp(c, hidden, dim) for k, c in heads.items()})
        self.predictors = nn.ModuleDict({k: predictor_mlp(dim, pred_hidden) for k in heads})
        self.momentum = EMATeacher(self._student(), base=momentum, final=momentum_final)

    @classmethod
    def from_options(
        cls, backbone: CNNBackbone | ViTBackbone, options: MaskDeepOptions, mask: FeatureMaskOptions
    ) -> MaskDeep:
        """Strides and groups from the ``feature`` mask's options, so model and stage agree."""
        return cls(backbone, tuple(mask.strides), mask.groups, options.targets, **options.heads())

    def _channels(self, backbone: CNNBackbone | ViTBackbone) -> list[int]:
        if isinstance(backbone, ViTBackbone):
            bad = [s for s in self.strides if s % backbone.patch_size]
            if bad:
                raise ValueError(f"ViT strides must be multiples of the patch size {backbone.patch_size}, got {bad}")
            return [backbone.embed_dim] * len(self.strides)
        missing = [s for s in self.strides if s not in backbone.strides]
        if missing:
            raise ValueError(f"the backbone has no stage of stride {missing}; its strides are {list(backbone.strides)}")
        return [backbone.channels[backbone.strides.index(s)] for s in self.strides]

    def _student(self) -> nn.ModuleDict:
        # A view over the online modules (no copy): what the EMA teacher follows.
        return nn.ModuleDict({"backbone": self.backbone, "projectors": self.projectors})

    def teachers(self) -> list[tuple[EMATeacher, nn.Module]]:
        """The ``(teacher, student)`` pair the training loop steps after each update."""
        return [(self.momentum, self._student())]

    def mask_stage(self, ratio: float = 0.5) -> FeatureMask:
        """A loader stage that draws this objective's masks (its strides and groups), ``ratio`` of the cells."""
        return FeatureMask(self.strides, ratio, self.groups)

    @staticmethod
    def levels(
        backbone: CNNBackbone | ViTBackbone, images: torch.Tensor, strides: tuple[int, ...]
    ) -> list[torch.Tensor]:
        """One encoder pass: ``(B, C_s, H / s, W / s)`` feature maps at ``strides``."""
        if isinstance(backbone, CNNBackbone):
            maps = backbone.features(images)
            return [maps[backbone.strides.index(s)] for s in strides]
        depth = len(backbone.model.blocks)
        picks = [max(0, round(depth * (i + 1) / len(strides)) - 1) for i in range(len(strides))]
        blocks = sorted(set(picks))  # a shallow ViT gives one block to several strides
        maps = backbone.model.forward_intermediates(
            images, indices=blocks, norm=True, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )
        outs = []
        for pick, stride in zip(picks, strides, strict=True):
            grid, factor = maps[blocks.index(pick)], stride // backbone.patch_size
            outs.append(F.avg_pool2d(grid, factor) if factor > 1 else grid)
        return outs

    def predict(self, maps: list[torch.Tensor], masks: FeatureMasks) -> torch.Tensor:
        """``(T, B, G, D)`` predictions from one view's feature maps and its masks."""
        pooled = [masked_pool(f, masks[s]) for f, s in zip(maps, self.strides, strict=True)]  # each (B, G, C_s)
        batch, groups = pooled[0].shape[:2]
        inputs = {"global": torch.cat(pooled, dim=-1)}
        if self.targets == "multi":
            inputs.update({f"stride{s}": p for s, p in zip(self.strides, pooled, strict=True)})
        out = []
        for key, x in inputs.items():
            z = self.projectors[key](x.flatten(0, 1))  # (B * G, C): batch norm sees every group
            out.append(self.predictors[key](z).view(batch, groups, -1))
        return torch.stack(out)

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """``(T, B, D)``: the EMA teacher's embeddings of unmasked ``images``."""
        teacher = self.momentum.module
        pooled = [f.mean(dim=(2, 3)) for f in self.levels(teacher["backbone"], images, self.strides)]
        out = [teacher["projectors"]["global"](torch.cat(pooled, dim=-1))]
        if self.targets == "multi":
            out += [teacher["projectors"][f"stride{s}"](p) for s, p in zip(self.strides, pooled, strict=True)]
        return torch.stack(out)

    def _view_masks(self, batch: Batch) -> tuple[FeatureMasks, FeatureMasks]:
        masks = batch.extras.get(FeatureMask.view_key)
        if masks is None or len(masks) < 2:
            raise ValueError(
                "MaskDeep needs feature masks for two views: put Views(2, ...) before its FeatureMask stage "
                "(objective.mask_stage())"
            )
        for m in masks[:2]:
            if m.strides != self.strides or m.groups != self.groups:
                raise ValueError(
                    f"the batch's feature masks have strides {m.strides} and {m.groups} groups; this MaskDeep "
                    f"expects strides {self.strides} and {self.groups} groups"
                )
        return masks[0], masks[1]

    def forward(self, batch: Batch) -> ObjectiveOutput:
        x1, x2 = two_views(batch, "MaskDeep")
        m1, m2 = self._view_masks(batch)
        p1 = self.predict(self.levels(self.backbone, x1, self.strides), m1)
        p2 = self.predict(self.levels(self.backbone, x2, self.strides), m2)
        loss = (maskdeep_loss(p1, self.target(x2)) + maskdeep_loss(p2, self.target(x1))) / 2
        return ObjectiveOutput(loss, {"loss": loss.detach(), "targets": torch.tensor(float(p1.shape[0]))})

    def extra_repr(self) -> str:
        return f"strides={self.strides}, groups={self.groups}, targets={self.targets!r}"
