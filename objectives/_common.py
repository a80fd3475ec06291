"""What every objective returns, and small shared helpers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange

from masklab.pipeline import Batch
from masklab.transforms import MASKS, MaskOptions

from .registry import ObjectiveOptions

__all__ = [
    "GuidanceMixin",
    "ObjectiveOutput",
    "TeacherOptions",
    "concat_all_gather",
    "gather_tokens",
    "patchify",
    "two_views",
    "unpatchify",
]


@dataclass
class ObjectiveOutput:
    """A training step's loss and what is worth logging (detached scalars)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order; ``x`` itself in one process.

    No gradient flows through the gather (use it for keys, never for queries).

    Shape:
        ``(B, ...) -> (world_size * B, ...)``; every rank must pass the same shape.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, p * p * C)``, patches in row-major grid order."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    return rearrange(
        patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch_size, q=patch_size, c=channels
    )


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each sample's tokens at ``ids``, in ``ids`` order.

    Shape:
        ``(B, N, D)`` tokens and ``(B, K)`` indices into ``N`` -> ``(B, K, D)``.
    """
    return tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def two_views(batch: Batch, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch.views[0]`` and ``batch.views[1]``, or a ``ValueError`` that names ``objective`` and the fix."""
    got = 0 if batch.views is None else len(batch.views)
    if got < 2:
        raise ValueError(f"{objective} needs two views in batch.views, got {got}: add Views(2, ...) to the loader")
    return batch.views[0], batch.views[1]


@dataclass
class TeacherOptions(ObjectiveOptions):
    """Options of an objective that may keep an EMA teacher of its backbone (it guides EHM's affinity):
    the teacher's decay at the start (``None``: no teacher, e.g. 0.996) and at the end (cosine)."""

    teacher_decay: float | None = None
    teacher_final_decay: float = 1.0

    def teacher(self, mask: MaskOptions) -> dict[str, float | None]:
        """The teacher's constructor arguments; a mask that reads a teacher's affinity needs one."""
        if MASKS[mask.name].guide == "affinity" and self.teacher_decay is None:
            raise ValueError(
                f"mask {mask.name!r} reads an EMA teacher's affinity: set objective.teacher_decay (e.g. 0.996)"
            )
        return {"teacher_decay": self.teacher_decay, "teacher_final_decay": self.teacher_final_decay}


class GuidanceMixin:
    """``guidance(kind)`` for model-guided stages, and an optional EMA teacher of the backbone.

    ``saliency`` (AMT) reads the *online* backbone; ``affinity`` (EHM) reads
    the EMA teacher when the objective has one (:meth:`add_teacher`), else
    the online backbone. The guide runs under ``no_grad`` in eval mode and
    restores the training mode after. An objective with a teacher lists it
    in :meth:`teachers`, so the training loop steps it after every update.
    """

    guides = ("saliency", "affinity")

    def add_teacher(self, decay: float | None, final_decay: float = 1.0) -> None:
        """Keep an EMA copy of ``self.backbone`` (``decay`` at the start, cosine to ``final_decay``); ``None``: none."""
        from .ema import EMATeacher

        self.teacher = None if decay is None else EMATeacher(self.backbone, decay, final_decay)

    def teachers(self) -> list:
        """``(EMATeacher, student)`` pairs the loop steps after each update."""
        teacher = getattr(self, "teacher", None)
        return [] if teacher is None else [(teacher, self.backbone)]

    def guidance(self, kind: str):
        if kind not in self.guides:
            raise ValueError(
                f"unknown guidance {kind!r}; {type(self).__name__} offers {', '.join(map(repr, self.guides))}"
            )
        teacher = getattr(self, "teacher", None)
        backbone = teacher.module if kind == "affinity" and teacher is not None else self.backbone

        def guide(images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
            was_training = backbone.training
            backbone.eval()
            try:
                if kind == "saliency":
                    return backbone.saliency(images, grid)
                return backbone.affinity(images) if backbone.family == "vit" else backbone.affinity(images, grid)
            finally:
                backbone.train(was_training)

        return guide
