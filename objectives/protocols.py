"""Abilities an objective may have beyond ``forward``, declared once, so the training loop asks ``isinstance``.

An objective :class:`OffersGuidance` to model-guided stages
(:class:`~masklab.transforms.protocols.GuidedStage`) and
:class:`HasTeachers` when it keeps EMA teachers the loop steps after each
update. Having the methods is enough (structural typing).

Examples:
    >>> import torch
    >>> from masklab.objectives import MAE, build_backbone
    >>> vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    >>> mae = MAE(vit, decoder_dim=32, decoder_depth=1)
    >>> isinstance(mae, OffersGuidance), isinstance(mae, HasTeachers), mae.teachers()
    (True, True, [])
    >>> isinstance(torch.nn.Linear(2, 2), (OffersGuidance, HasTeachers))
    False
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from masklab.transforms.protocols import Guide

from .ema import EMATeacher

__all__ = ["HasTeachers", "OffersGuidance"]


@runtime_checkable
class OffersGuidance(Protocol):
    """An objective whose model can guide stages."""

    def guidance(self, kind: str) -> Guide:
        """The guide of ``kind`` (one of ``masklab.transforms.registry.GUIDES``); ``ValueError`` for a kind it lacks."""


@runtime_checkable
class HasTeachers(Protocol):
    """An objective with EMA teachers (BYOL/MoCo's momentum encoder, EHM's affinity teacher)."""

    def teachers(self) -> list[tuple[EMATeacher, nn.Module]]:
        """``(teacher, student)`` pairs to step after every update (empty when it keeps none)."""
