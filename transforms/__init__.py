"""masklab.transforms: mask stages, view and augmentation stages, mixing.

Every stage is an ``nn.Module`` on a :class:`~masklab.pipeline.Batch` with a
plain functional form on tensors; random draws (``make_params``) are apart
from their application (``apply``), on the batch's device.
"""

from ._mask_stage import PatchMaskStage, erase_patches
from .attention_mask import AttentionMask, align_maps, amt_refresh_epochs, attention_patch_mask
from .block_mask import BlockDraw, BlockMask, block_cells, block_patch_mask
from .feature_mask import FeatureMask, FeatureMasks, feature_masks
from .hierarchical_mask import (
    SCHEDULES,
    HierarchicalMask,
    HierarchyDraw,
    RegionTree,
    grid_edges,
    hierarchical_patch_mask,
    region_tree,
    regions_at,
)
from .mix_mask import MixMask, MixParams, mix_images, mix_targets, mixmask_params
from .normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize, normalize
from .patch_mask import MASKED, THROWN, VISIBLE, PatchMask
from .random_mask import RandomMask, mask_from_scores, random_patch_mask
from .simmim_mask import SimMIMMask, simmim_patch_mask
from .views import PRESETS, ViewParams, ViewRecipe, Views, apply_view, draw_view_params

MASK_STAGES = {
    "random": RandomMask,
    "block": BlockMask,
    "simmim": SimMIMMask,
    "mixmask": MixMask,
    "feature": FeatureMask,
}
"""The model-free mask stages by name; ``AttentionMask`` (AMT) and ``HierarchicalMask`` (EHM) also need a guide."""

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MASKED",
    "MASK_STAGES",
    "PRESETS",
    "SCHEDULES",
    "THROWN",
    "VISIBLE",
    "AttentionMask",
    "BlockDraw",
    "BlockMask",
    "FeatureMask",
    "FeatureMasks",
    "HierarchicalMask",
    "HierarchyDraw",
    "MixMask",
    "MixParams",
    "Normalize",
    "PatchMask",
    "PatchMaskStage",
    "RandomMask",
    "RegionTree",
    "SimMIMMask",
    "ViewParams",
    "ViewRecipe",
    "Views",
    "align_maps",
    "amt_refresh_epochs",
    "apply_view",
    "attention_patch_mask",
    "block_cells",
    "block_patch_mask",
    "draw_view_params",
    "erase_patches",
    "feature_masks",
    "grid_edges",
    "hierarchical_patch_mask",
    "mask_from_scores",
    "mix_images",
    "mix_targets",
    "mixmask_params",
    "normalize",
    "random_patch_mask",
    "region_tree",
    "regions_at",
    "simmim_patch_mask",
]
