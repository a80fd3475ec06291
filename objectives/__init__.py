"""masklab.objectives: backbone adapters, heads, losses and EMA teachers.

Objectives consume what the stages emit (a :class:`~masklab.pipeline.Batch`
with a :class:`~masklab.transforms.PatchMask`) and never see a loader. Each
registers itself in :data:`OBJECTIVES` where it is defined (:mod:`.registry`);
which masks and backbone families it takes is derived from that (:mod:`.compat`).
"""

from masklab.transforms import import_modules

from ._common import ObjectiveOutput, TeacherOptions, concat_all_gather, patchify, unpatchify
from .backbones import (
    CNNBackbone,
    ViTBackbone,
    backbone_family,
    build_backbone,
    create_timm,
    minmax,
    sincos_pos_embed,
)
from .compat import Support, check_compatible, compatibility, compatibility_table, mask_table, supported_triples
from .ema import EMATeacher, cosine_decay
from .heads import HeadOptions, predictor_mlp, projection_mlp
from .hpm import HPM, HPMOptions, pairwise_order_loss
from .ijepa import IJEPA, IJEPAOptions, ijepa_loss
from .infonce import KeyQueue, infonce_loss
from .mae import MAE, MAEOptions, mae_loss, mae_patch_losses
from .maskdeep import TARGETS, MaskDeep, MaskDeepOptions, maskdeep_loss, masked_pool
from .mixmask import MixMaskSiamese, mixmask_loss, mixmask_terms
from .negative_cosine import negative_cosine
from .protocols import HasTeachers, OffersGuidance
from .registry import OBJECTIVES, ObjectiveEntry, ObjectiveOptions, register_objective
from .shuffle_bn import shuffle_bn
from .siamese import BASES, BaseSpec, Siamese, SiameseOptions
from .simmim import SimMIM, SimMIMOptions, simmim_loss
from .supervised import Supervised, SupervisedOptions

import_modules(__name__, __path__)  # an objective module not named above registers too

__all__ = [
    "HasTeachers",
    "OffersGuidance",
    "TARGETS",
    "MaskDeep",
    "MaskDeepOptions",
    "maskdeep_loss",
    "masked_pool",
    "BASES",
    "HPM",
    "HPMOptions",
    "IJEPA",
    "IJEPAOptions",
    "ijepa_loss",
    "MAE",
    "MAEOptions",
    "OBJECTIVES",
    "BaseSpec",
    "CNNBackbone",
    "EMATeacher",
    "HeadOptions",
    "KeyQueue",
    "MixMaskSiamese",
    "ObjectiveEntry",
    "ObjectiveOptions",
    "ObjectiveOutput",
    "Siamese",
    "SiameseOptions",
    "SimMIM",
    "SimMIMOptions",
    "Supervised",
    "SupervisedOptions",
    "Support",
    "TeacherOptions",
    "ViTBackbone",
    "backbone_family",
    "build_backbone",
    "check_compatible",
    "compatibility",
    "compatibility_table",
    "concat_all_gather",
    "cosine_decay",
    "create_timm",
    "infonce_loss",
    "mae_loss",
    "mae_patch_losses",
    "pairwise_order_loss",
    "mask_table",
    "minmax",
    "sincos_pos_embed",
    "mixmask_loss",
    "mixmask_terms",
    "negative_cosine",
    "patchify",
    "predictor_mlp",
    "projection_mlp",
    "register_objective",
    "shuffle_bn",
    "simmim_loss",
    "supported_triples",
    "unpatchify",
]
