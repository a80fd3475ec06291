"""The Accelerator a run computes with, the one rule for its device, and agreement between its processes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

from .config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["agree", "make_accelerator", "mixed_precision", "resolve_device"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """The device ``run.device`` names: ``auto`` is CUDA where there is one, else the CPU.

    Examples:
        >>> resolve_device("cpu"), resolve_device("cuda:1")
        (device(type='cpu'), device(type='cuda', index=1))
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def mixed_precision(name: str, device: torch.device) -> str:
    """``optim.mixed_precision`` for Accelerate: ``auto`` is bf16 on a CUDA device that supports it, else ``no``."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


TRACKER_MODULES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "aim": "aim",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
"""Accelerate's trackers and the package each needs."""


def trackers(names: list[str]) -> list[str]:
    """The Accelerate trackers ``run.log_with`` asks for (``metrics.csv`` is always written).

    ``auto``: TensorBoard if it is installed, else none; ``all``: every installed tracker;
    ``none``: none; else the named trackers, each of which must be installed.

    Raises:
        ValueError: a named tracker whose package is not installed (named, with the pip line).
    """
    import importlib.util

    def installed(name: str) -> bool:
        return importlib.util.find_spec(TRACKER_MODULES.get(name, name)) is not None

    if names == ["none"]:
        return []
    if names == ["auto"]:
        if installed("tensorboard"):
            return ["tensorboard"]
        logger.info("tensorboard is not installed: metrics go to metrics.csv only")
        return []
    if names == ["all"]:
        return [name for name in TRACKER_MODULES if installed(name)]
    missing = [name for name in names if not installed(name)]
    if missing:
        raise ValueError(
            f"run.log_with asks for {missing}, not installed: pip install "
            + " ".join(TRACKER_MODULES.get(m, m) for m in missing)
        )
    return list(names)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator of ``cfg``: its device, precision and gradient accumulation, its trackers (:func:`trackers`).

    Checkpoint folders are named by the run (``ckpt-UPDATE``), not by
    Accelerate's automatic naming: see :mod:`masklab.recipes.checkpoint`.
    """
    from accelerate import Accelerator

    device = resolve_device(cfg.run.device)
    log_with = trackers(list(cfg.run.log_with))
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed_precision(cfg.optim.mixed_precision, device),
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=log_with or None,
        project_dir=cfg.run.out,
    )


def agree(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """``work()`` on every process; if it fails on any process, it fails on every one (none waits forever).

    A ``ValueError`` or ``OSError`` is re-raised where it happened; the other
    processes raise a ``RuntimeError`` quoting it. ``work`` must not itself
    wait for the other processes after a point where it may fail.
    """
    try:
        result, failure = work(), None
    except (ValueError, OSError) as error:
        result, failure = None, error
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        messages = [m for m in gather_object([None if failure is None else str(failure)]) if m]
        if messages and failure is None:
            raise RuntimeError(f"another process refused the run: {messages[0]}")
    if failure is not None:
        raise failure
    return result
