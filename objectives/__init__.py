"""masklab.objectives: backbone adapters, heads, losses and EMA teachers.

Objectives consume what the stages emit (a :class:`~masklab.pipeline.Batch`
with a :class:`~masklab.transforms.PatchMask`) and never see a loader.
"""

from functools import partial

from ._common import ObjectiveOutput, concat_all_gather, patchify, unpatchify
from .backbones import CNNBackbone, ViTBackbone, backbone_family, build_backbone, minmax
from .compat import COMPATIBILITY, Support, check_compatible, compatibility_table, supported_triples
from .ema import EMATeacher, cosine_decay
from .heads import predictor_mlp, projection_mlp
from .infonce import KeyQueue, infonce_loss
from .mae import MAE, mae_loss
from .maskdeep import TARGETS, MaskDeep, maskdeep_loss, masked_pool
from .mixmask import MixMaskSiamese, mixmask_loss, mixmask_terms
from .negative_cosine import negative_cosine
from .siamese import BASES, BaseSpec, Siamese
from .simmim import SimMIM, simmim_loss
from .supervised import Supervised

OBJECTIVES = {
    "mae": MAE,
    "simmim": SimMIM,
    "maskdeep": MaskDeep,
    **{base: partial(Siamese, base=base) for base in BASES},
    **{f"mixmask_{base}": partial(MixMaskSiamese, base=base) for base in BASES},
}
"""objective name (as in ``COMPATIBILITY``) -> a callable ``(backbone, **options) -> objective``."""

__all__ = [
    "TARGETS",
    "MaskDeep",
    "maskdeep_loss",
    "masked_pool",
    "BASES",
    "COMPATIBILITY",
    "MAE",
    "OBJECTIVES",
    "BaseSpec",
    "CNNBackbone",
    "EMATeacher",
    "KeyQueue",
    "MixMaskSiamese",
    "ObjectiveOutput",
    "Siamese",
    "SimMIM",
    "Supervised",
    "Support",
    "ViTBackbone",
    "backbone_family",
    "build_backbone",
    "check_compatible",
    "compatibility_table",
    "concat_all_gather",
    "cosine_decay",
    "infonce_loss",
    "mae_loss",
    "minmax",
    "mixmask_loss",
    "mixmask_terms",
    "negative_cosine",
    "patchify",
    "predictor_mlp",
    "projection_mlp",
    "simmim_loss",
    "supported_triples",
    "unpatchify",
]
