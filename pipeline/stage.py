"""Stages and the stage chain: batched transforms that run on the batch's device.

A stage is an ``nn.Module`` whose ``forward(batch) -> batch`` returns a new
:class:`~masklab.pipeline.Batch` and never writes into its input's tensors.
Random stages split the draw from the application, as torchvision's
transforms v2 and kornia do: ``make_params(batch, generator)`` draws
everything random (on the batch's device), ``apply(batch, params)`` is pure.
So a draw can be replayed on another view, logged, or regenerated on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .batch import Batch

if TYPE_CHECKING:
    from torchdata.nodes import BaseNode

__all__ = ["Stage", "Chain", "Lambda", "batch_generator", "clamp_progress", "derive_seed", "stage_node"]

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 on each part).

    Pure host arithmetic on Python ints, so deriving a batch's seed from
    ``(seed, epoch, step, rank)`` costs no device synchronisation.

    Examples:
        >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
        True
        >>> derive_seed(0, 1, 2) == derive_seed(0, 2, 1)
        False
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def clamp_progress(progress: float) -> float:
    """Training progress as a Python float in ``[0, 1]``, what schedules read (0: the start, 1: the end).

    Examples:
        >>> [clamp_progress(t) for t in (-0.5, 0.25, 1.02)]
        [0.0, 0.25, 1.0]
    """
    return min(max(float(progress), 0.0), 1.0)


def batch_generator(batch: Batch, salt: int = 0) -> torch.Generator | None:
    """A generator on ``batch.device`` seeded from ``batch.seed`` and ``salt``.

    Returns ``None`` when the batch carries no seed: stages then draw from
    torch's global generator, as any torch op does, which suits a supervised
    loop that calls a stage on a plain batch.
    """
    if batch.seed is None:
        return None
    generator = torch.Generator(device=batch.device)
    generator.manual_seed(derive_seed(batch.seed, salt))
    return generator


class Stage(nn.Module):
    """Base class of batch stages.

    Subclasses either override :meth:`forward` (deterministic stages) or
    implement :meth:`make_params` and :meth:`apply` (random stages).
    """

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> Any:
        """Draw this call's randomness on ``batch.device``."""
        return None

    def apply(self, batch: Batch, params: Any) -> Batch:
        """Apply ``params`` to ``batch`` without mutating it."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply() or forward()")

    def forward(self, batch: Batch) -> Batch:
        return self.apply(batch, self.make_params(batch, batch_generator(batch)))


class Lambda(Stage):
    """Wrap a plain ``fn(batch) -> batch`` as a stage."""

    def __init__(self, fn: Callable[[Batch], Batch], name: str | None = None) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"Lambda needs a callable, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "lambda")

    def forward(self, batch: Batch) -> Batch:
        return self.fn(batch)

    def extra_repr(self) -> str:
        return self.name


class Chain(Stage):
    """Run stages in order.

    Each stage sees the batch with its own seed, derived from the batch's
    seed and the stage's position, so adding a stage at the end never changes
    what the stages before it draw. The output keeps the input's seed.

    Args:
        stages: ``nn.Module`` stages or plain callables ``batch -> batch``.

    Examples:
        >>> import torch
        >>> from masklab.pipeline import Batch
        >>> double = Lambda(lambda b: b.replace(images=b.images * 2))
        >>> out = Chain([double, double])(Batch(images=torch.ones(1, 3, 2, 2)))
        >>> out.images.max().item()
        4.0
    """

    def __init__(self, stages: Iterable[nn.Module | Callable[[Batch], Batch]] = ()) -> None:
        super().__init__()
        modules = []
        for stage in stages:
            if isinstance(stage, nn.Module):
                modules.append(stage)
            elif callable(stage):
                modules.append(Lambda(stage))
            else:
                raise TypeError(f"a stage must be an nn.Module or a callable batch -> batch, got {stage!r}")
        self.stages = nn.ModuleList(modules)

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):
        return iter(self.stages)

    def forward(self, batch: Batch) -> Batch:
        if not isinstance(batch, Batch):
            raise TypeError(f"Chain expects a masklab Batch, got {type(batch).__name__}")
        base = batch.seed
        for position, stage in enumerate(self.stages):
            if base is not None:
                batch = batch.replace(seed=derive_seed(base, position))
            out = stage(batch)
            if not isinstance(out, Batch):
                raise TypeError(
                    f"stage {position} ({type(stage).__name__}) returned {type(out).__name__}, expected a Batch"
                )
            batch = out
        return batch.replace(seed=base) if batch.seed != base else batch


def stage_node(
    source: Any, stages: Sequence[nn.Module | Callable[[Batch], Batch]] | Chain, prefetch: int = 0
) -> BaseNode:
    """Compose a stage chain as ``torchdata.nodes``: ``Mapper`` (and ``Prefetcher``).

    Args:
        source: a ``torchdata.nodes.BaseNode`` or any iterable of batches
            (a masklab loader, a list ...).
        stages: the stages to map over every batch.
        prefetch: if positive, a ``Prefetcher`` keeps this many batches ready.

    Returns:
        A ``torchdata.nodes.BaseNode``; wrap it in ``torchdata.nodes.Loader``
        to iterate.
    """
    from torchdata.nodes import BaseNode, IterableWrapper, Mapper, Prefetcher

    node = source if isinstance(source, BaseNode) else IterableWrapper(source)
    chain = stages if isinstance(stages, Chain) else Chain(stages)
    node = Mapper(node, chain)
    if prefetch > 0:
        node = Prefetcher(node, prefetch_factor=prefetch)
    return node
