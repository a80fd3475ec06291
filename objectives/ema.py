"""An EMA teacher with a decay schedule, on timm's ModelEmaV3."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from masklab.pipeline import clamp_progress

__all__ = ["EMATeacher", "cosine_decay"]


def cosine_decay(progress: float, base: float = 0.996, final: float = 1.0) -> float:
    """BYOL's schedule: ``final - (final - base) * (cos(pi * progress) + 1) / 2`` for progress in [0, 1]."""
    return final - (final - base) * (math.cos(math.pi * clamp_progress(progress)) + 1) / 2


class EMATeacher(nn.Module):
    """A frozen copy of ``model`` that follows it by exponential moving average.

    Args:
        model: the student.
        base: decay at the start of training.
        final: decay at the end (cosine schedule in between); ``final == base`` keeps it constant.

    Examples:
        >>> import torch
        >>> student = torch.nn.Linear(2, 2)
        >>> teacher = EMATeacher(student, base=0.5, final=0.5)
        >>> with torch.no_grad():
        ...     _ = student.weight.add_(1.0)
        >>> teacher.update(student, progress=0.0)
        >>> bool(torch.allclose(teacher.module.weight, student.weight - 0.5))
        True
    """

    def __init__(self, model: nn.Module, base: float = 0.996, final: float = 1.0) -> None:
        super().__init__()
        if not 0 <= base <= final <= 1:
            raise ValueError(f"need 0 <= base <= final <= 1, got base={base}, final={final}")
        self.base, self.final = base, final
        self.ema = ModelEmaV3(model, decay=base, foreach=True)
        self.ema.module.requires_grad_(False)
        # timm's EMA puts its copy in eval mode; ours follows train()/eval() like any submodule, starting
        # in the student's mode (BYOL's and MoCo's targets normalise with batch statistics in training).
        self.ema.module.train(model.training)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def decay_at(self, progress: float) -> float:
        """The EMA decay at ``progress`` in ``[0, 1]`` of training: cosine from ``base`` to ``final``."""
        return cosine_decay(progress, self.base, self.final)

    @torch.no_grad()
    def update(self, model: nn.Module, progress: float) -> None:
        """Move the teacher toward ``model`` with the decay for training ``progress`` in [0, 1]."""
        self.ema.decay = self.decay_at(progress)
        self.ema.update(model)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)
