"""Supervised classification with masklab's stages as augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from masklab.pipeline import Batch
from masklab.transforms import MixParams, PatchMask, erase_patches, mix_targets

from ._common import ObjectiveOutput
from .registry import ObjectiveOptions

__all__ = ["Supervised", "SupervisedOptions"]


@dataclass
class SupervisedOptions(ObjectiveOptions):
    """The ``objective`` section of the tasks that train a classifier (supervised, finetune): MixMask
    as a CutMix-like regulariser on a ``mixmask_grid`` layout, block patch erasing (a ratio; 0: off),
    and label smoothing. Not a pretraining objective, so not in the registry."""

    name: str = "supervised"
    mixmask: bool = False
    mixmask_grid: int = 4
    erase_ratio: float = 0.0
    label_smoothing: float = 0.0


class Supervised(nn.Module):
    """A classifier trained on the loader's batches, reusing mask and mix stages.

    When the batch carries a MixMask draw (``batch.mix``), the mixed images
    are classified against ``lam * y + (1 - lam) * y[partner]``; when it
    carries a :class:`PatchMask` (``batch.mask``), hidden patches are erased
    (set to 0, the mean after normalisation) first.

    Args:
        model: a timm classifier with ``num_classes`` outputs.
        num_classes: ``K``.
        label_smoothing: mass spread over all classes.
    """

    name = "supervised"

    def __init__(self, model: nn.Module, num_classes: int, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model, self.num_classes, self.label_smoothing = model, int(num_classes), float(label_smoothing)

    def forward(self, batch: Batch) -> ObjectiveOutput:
        if batch.labels is None:
            raise ValueError("supervised training needs labels in the batch")
        images = batch.images
        targets = F.one_hot(batch.labels.long(), self.num_classes).to(images.dtype)
        if batch.mix is not None:
            mix = batch.mix
            images = mix["images"]
            params = MixParams(mix["own"], mix["lam"], mix["partner"], mix["inverse"])
            targets = mix_targets(targets, params)
        if isinstance(batch.mask, PatchMask):
            images = erase_patches(images, batch.mask)
        logits = self.model(images)
        # Soft (B, K) targets: -sum(targets * log_softmax(logits)) per sample, smoothed toward 1 / K first.
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(1) == batch.labels).float().mean()
        return ObjectiveOutput(loss, {"loss": loss.detach(), "accuracy": accuracy.detach()})
