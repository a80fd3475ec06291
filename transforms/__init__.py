"""masklab.transforms: mask stages, view and augmentation stages, mixing.

Every stage is an ``nn.Module`` on a :class:`~masklab.pipeline.Batch` with a
plain functional form on tensors; random draws (``make_params``) are apart
from their application (``apply``), on the batch's device.

Every mask stage registers itself in :data:`MASKS` where it is defined, with
its options (a dataclass that is also the config's ``mask`` section), what it
emits, the guidance it needs and a small-image factory (:mod:`.registry`).
"""

from ._mask_stage import FollowsProgress, GuidedPatchMaskStage, PatchMaskStage, erase_patches
from ._sampling import ceil_count, check_ratio, mask_count, patch_grid
from .attention_mask import AttentionMask, AttentionMaskOptions, align_maps, amt_refresh_epochs, attention_patch_mask
from .attmask import ATTMASK_MODES, AttMask, AttMaskOptions, attmask_patch_mask
from .block_mask import BlockDraw, BlockMask, BlockMaskOptions, block_cells, block_patch_mask
from .color_noise_mask import COLORS, ColorNoiseMask, ColorNoiseMaskOptions, color_filter, color_noise, color_noise_mask
from .feature_mask import (
    FeatureMask,
    FeatureMaskOptions,
    FeatureMasks,
    check_groups,
    feature_masks,
    feature_strides,
)
from .hard_patch_mask import HardPatchDraw, HardPatchMask, HardPatchMaskOptions, hard_fraction_at, hard_patch_mask
from .hierarchical_mask import (
    SCHEDULES,
    HierarchicalMask,
    HierarchicalMaskOptions,
    HierarchyDraw,
    RegionTree,
    grid_edges,
    hierarchical_patch_mask,
    region_tree,
    regions_at,
)
from .mix_mask import MixMask, MixMaskOptions, MixParams, mix_images, mix_targets, mixmask_params, own_cell_count
from .multiblock_mask import (
    MultiBlockDraw,
    MultiBlockMask,
    MultiBlockMaskOptions,
    block_sizes,
    multiblock_cells,
    multiblock_patch_mask,
)
from .normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize, normalize
from .patch_mask import MASKED, THROWN, VISIBLE, PatchMask
from .protocols import Guide, GuidedStage, ProgressAware, RefreshesCache
from .random_mask import RandomMask, RandomMaskOptions, mask_from_scores, random_patch_mask
from .registry import (
    MASKS,
    MaskContext,
    MaskEntry,
    MaskOptions,
    Registry,
    import_modules,
    option_names,
    register_mask,
)
from .simmim_mask import SimMIMMask, SimMIMMaskOptions, simmim_patch_mask
from .views import PRESETS, ViewParams, ViewRecipe, Views, apply_view, draw_view_params

import_modules(__name__, __path__)  # a stage module not named above registers too

__all__ = [
    "Guide",
    "GuidedStage",
    "ProgressAware",
    "RefreshesCache",
    "COLORS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MASKED",
    "MASKS",
    "PRESETS",
    "SCHEDULES",
    "THROWN",
    "VISIBLE",
    "AttentionMask",
    "AttentionMaskOptions",
    "BlockDraw",
    "BlockMask",
    "BlockMaskOptions",
    "ColorNoiseMask",
    "ColorNoiseMaskOptions",
    "FeatureMask",
    "FeatureMaskOptions",
    "FeatureMasks",
    "FollowsProgress",
    "GuidedPatchMaskStage",
    "HardPatchDraw",
    "HardPatchMask",
    "ATTMASK_MODES",
    "AttMask",
    "AttMaskOptions",
    "attmask_patch_mask",
    "HardPatchMaskOptions",
    "HierarchicalMask",
    "HierarchicalMaskOptions",
    "HierarchyDraw",
    "MaskContext",
    "MaskEntry",
    "MaskOptions",
    "MixMask",
    "MixMaskOptions",
    "MixParams",
    "MultiBlockDraw",
    "MultiBlockMask",
    "MultiBlockMaskOptions",
    "Normalize",
    "PatchMask",
    "PatchMaskStage",
    "RandomMask",
    "RandomMaskOptions",
    "RegionTree",
    "Registry",
    "SimMIMMask",
    "SimMIMMaskOptions",
    "ViewParams",
    "ViewRecipe",
    "Views",
    "align_maps",
    "amt_refresh_epochs",
    "apply_view",
    "attention_patch_mask",
    "block_cells",
    "block_patch_mask",
    "block_sizes",
    "ceil_count",
    "check_groups",
    "check_ratio",
    "color_filter",
    "color_noise",
    "color_noise_mask",
    "draw_view_params",
    "erase_patches",
    "feature_masks",
    "feature_strides",
    "grid_edges",
    "hard_fraction_at",
    "hard_patch_mask",
    "hierarchical_patch_mask",
    "import_modules",
    "mask_count",
    "mask_from_scores",
    "mix_images",
    "mix_targets",
    "mixmask_params",
    "multiblock_cells",
    "multiblock_patch_mask",
    "normalize",
    "option_names",
    "own_cell_count",
    "patch_grid",
    "random_patch_mask",
    "region_tree",
    "regions_at",
    "register_mask",
    "simmim_patch_mask",
]
