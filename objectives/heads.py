"""MLP heads for siamese objectives: projectors and predictors (MoCo v2, BYOL, SimSiam)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .registry import ObjectiveOptions

__all__ = ["HeadOptions", "predictor_mlp", "projection_mlp"]


@dataclass
class HeadOptions(ObjectiveOptions):
    """Options of an objective with projector and predictor heads and an EMA target; ``None``: the
    objective's default. Projector hidden and output widths, predictor hidden width, and the
    target's EMA decay at the start and at the end."""

    proj_hidden: int | None = None
    proj_dim: int | None = None
    pred_hidden: int | None = None
    momentum: float | None = None
    momentum_final: float | None = None

    def heads(self) -> dict[str, Any]:
        """The options that are set, under the constructors' names (``hidden``, ``dim``, ``pred_hidden``, ...)."""
        given = {
            "hidden": self.proj_hidden,
            "dim": self.proj_dim,
            "pred_hidden": self.pred_hidden,
            "momentum": self.momentum,
            "momentum_final": self.momentum_final,
        }
        return {k: v for k, v in given.items() if v is not None}


def projection_mlp(
    in_dim: int, hidden: int, out: int, layers: int = 2, bn: bool = True, last_bn: bool = False
) -> nn.Sequential:
    """A projection head: ``layers`` linear layers, ``[BN] ReLU`` between them.

    MoCo v2: ``projection_mlp(2048, 2048, 128, bn=False)``; BYOL:
    ``projection_mlp(2048, 4096, 256)``; SimSiam:
    ``projection_mlp(2048, 2048, 2048, layers=3, last_bn=True)``.

    Args:
        in_dim: input features ``D``.
        hidden: width of the hidden layers.
        out: output features.
        layers: number of linear layers, at least 1.
        bn: batch norm after each hidden linear layer.
        last_bn: a batch norm without affine parameters on the output (SimSiam).

    Returns:
        ``nn.Sequential`` mapping ``(B, in_dim)`` to ``(B, out)``.

    Examples:
        >>> import torch
        >>> head = projection_mlp(8, 16, 4, layers=3, last_bn=True)
        >>> tuple(head(torch.rand(5, 8)).shape)
        (5, 4)
    """
    for name, value in (("in_dim", in_dim), ("hidden", hidden), ("out", out), ("layers", layers)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    modules: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        modules.append(nn.Linear(width, hidden, bias=not bn))
        if bn:
            modules.append(nn.BatchNorm1d(hidden))
        modules.append(nn.ReLU(inplace=True))
        width = hidden
    modules.append(nn.Linear(width, out, bias=not last_bn))
    if last_bn:
        modules.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*modules)


def predictor_mlp(dim: int, hidden: int) -> nn.Sequential:
    """BYOL's and SimSiam's predictor: ``Linear-BN-ReLU-Linear`` from ``dim`` back to ``dim``.

    Args:
        dim: the projection's output features.
        hidden: the predictor's hidden width (BYOL 4096; SimSiam's bottleneck 512).

    Returns:
        ``nn.Sequential`` mapping ``(B, dim)`` to ``(B, dim)``.
    """
    return projection_mlp(dim, hidden, dim, layers=2, bn=True)
