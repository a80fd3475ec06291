"""masklab.objectives: backbone adapters, heads, losses and EMA teachers.

Objectives consume what the stages emit (a :class:`~masklab.pipeline.Batch`
with a :class:`~masklab.transforms.PatchMask`) and never see a loader.
"""

from ._common import ObjectiveOutput, patchify, sincos_pos_embed, unpatchify
from .backbones import CNNBackbone, ViTBackbone, backbone_family, build_backbone, minmax
from .compat import COMPATIBILITY, Support, check_compatible, compatibility_table, supported_triples
from .ema import EMATeacher, cosine_decay
from .mae import MAE, mae_loss
from .simmim import SimMIM, simmim_loss
from .supervised import Supervised, soft_cross_entropy

OBJECTIVES = {"mae": MAE, "simmim": SimMIM}

__all__ = [
    "COMPATIBILITY",
    "MAE",
    "OBJECTIVES",
    "CNNBackbone",
    "EMATeacher",
    "ObjectiveOutput",
    "SimMIM",
    "Supervised",
    "Support",
    "ViTBackbone",
    "backbone_family",
    "build_backbone",
    "check_compatible",
    "compatibility_table",
    "cosine_decay",
    "mae_loss",
    "minmax",
    "patchify",
    "simmim_loss",
    "soft_cross_entropy",
    "sincos_pos_embed",
    "supported_triples",
    "unpatchify",
]
