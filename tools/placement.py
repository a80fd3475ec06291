"""Where a trained run's masks land: the share of object in the cells it masks, throws and keeps visible.

The informed masks rest on a premise about placement: AMT and AttMask mask the cells the model attends to,
taken to be the object; HPM the cells it finds hard; EHM whole parts of it. On the built-in shapes the
object is known pixel by pixel (:meth:`~masklab.pipeline.Shapes.coverage`), so the premise can be measured
rather than assumed: draw a trained run's own mask stage, guided by its own checkpoint, over held-out images
and average the object's share of the cells in each state. A random mask gives every state the share of all
cells; a mask that lands on the object gives MASKED more.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from masklab.transforms import MASKED, THROWN, VISIBLE

__all__ = ["PLACEMENT_IMAGES", "mask_placement", "placement_shares"]

PLACEMENT_IMAGES = 256
"""Held-out images :func:`mask_placement` draws over by default (the first of the test split)."""

STATES = {"visible": VISIBLE, "masked": MASKED, "thrown": THROWN}


def placement_shares(states: torch.Tensor, coverage: torch.Tensor) -> dict[str, float]:
    """Mean object share of the cells in each state, and of all cells.

    Args:
        states: ``(B, Gh, Gw)`` cell states (:data:`~masklab.transforms.VISIBLE`, ``MASKED``, ``THROWN``).
        coverage: ``(B, H, W)`` share of each pixel covered by the object, in [0, 1]; ``H`` and ``W``
            multiples of ``Gh`` and ``Gw``.

    Returns:
        ``{"visible", "masked", "thrown", "all"}`` to the mean, over the cells in that state, of the share
        of each cell's pixels that are object (a state no cell is in is left out).

    Examples:
        >>> states = torch.tensor([[[0, 1], [2, 1]]])
        >>> coverage = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.5],
        ...                           [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
        >>> placement_shares(states, coverage)
        {'visible': 1.0, 'masked': 0.5625, 'thrown': 0.0, 'all': 0.53125}
    """
    if states.ndim != 3 or coverage.ndim != 3 or states.shape[0] != coverage.shape[0]:
        raise ValueError(
            f"states must be (B, Gh, Gw) and coverage (B, H, W) for the same B, got {tuple(states.shape)} "
            f"and {tuple(coverage.shape)}"
        )
    (gh, gw), (height, width) = states.shape[1:], coverage.shape[1:]
    if height % gh or width % gw:
        raise ValueError(f"coverage of {height}x{width} pixels does not divide into the {gh}x{gw} grid")
    cells = F.avg_pool2d(coverage[:, None].double(), (height // gh, width // gw))[:, 0]
    shares = {name: cells[states == state] for name, state in STATES.items()}
    out = {name: float(values.mean()) for name, values in shares.items() if values.numel()}
    return {**out, "all": float(cells.mean())}


def mask_placement(
    checkpoint: str | os.PathLike,
    n: int = PLACEMENT_IMAGES,
    seed: int | None = None,
    background: str = "grey",
    mask_of: str | None = None,
) -> dict[str, float] | None:
    """:func:`placement_shares` of a pretraining checkpoint's own mask stage over the first ``n`` test images
    of the built-in shapes (at the checkpoint's resolution, on ``background``), or ``None`` when its mask
    emits no patch mask (MixMask's mixing, MaskDeep's feature masks, supervised runs).

    The stage is the one the run trained with (its config's ``mask``), guided by the checkpoint's model as in
    training: AMT's cache refreshed with the trained model's saliency of these images (uncropped), every
    schedule at its end (progress 1). The images are whole, as the test split's, not cropped or flipped. The
    draw's ``seed`` is the run's own (``run.seed``) unless given, so the seeds of an unguided mask draw apart.

    ``mask_of`` (a recipe name or YAML file) draws that recipe's mask instead of the run's own, guided by the
    checkpoint's model: e.g. ``mask_of="mae_amt"`` on an MAE checkpoint says where AMT's masks would land if
    drawn from that model's attention (the study's budget curves do this at each point of MAE's training).

    Raises:
        ValueError: ``n`` below 1, or a ``mask_of`` whose mask needs guidance the checkpoint's model lacks.
    """
    from masklab.pipeline import Batch, Shapes
    from masklab.recipes.build import family_of, mask_stages, patch_size_of
    from masklab.recipes.config import load_config
    from masklab.recipes.train import bind_guidance, load_trained, set_progress
    from masklab.transforms import Normalize, PatchMask, RefreshesCache, patch_grid

    if n < 1:
        raise ValueError(f"n (images to draw over) must be at least 1, got {n}")
    cfg, model = load_trained(checkpoint)
    family = family_of(model)
    if mask_of is not None:
        cfg = replace(cfg, mask=load_config(mask_of).mask)
    stages = mask_stages(cfg, family, num_samples=n) if cfg.task == "pretrain" else []  # not the erasing
    if not stages:
        return None
    device = next(model.parameters()).device
    size = cfg.data.resolution
    data = Shapes(size=size, length=n, seed=0, split="test", background=background)
    images = torch.tensor(np.stack([data[i][0] for i in range(n)])).permute(0, 3, 1, 2).float() / 255
    coverage = torch.tensor(np.stack([data.coverage(i) for i in range(n)]))
    index = torch.arange(n, device=device)
    seed = cfg.run.seed if seed is None else seed
    batch = Normalize(cfg.data.mean, cfg.data.std)(Batch(images=images.to(device), index=index, seed=seed))
    bind_guidance(stages, model)
    set_progress(stages, 1.0)
    grid = patch_grid(size, size, patch_size_of(cfg, family))
    with torch.no_grad():
        for stage in stages:
            if isinstance(stage, RefreshesCache):
                stage.refresh([Batch(images=batch.images, index=index)], grid)
            batch = stage(batch)
    if not isinstance(batch.mask, PatchMask):
        return None
    return placement_shares(batch.mask.states.cpu(), coverage)
