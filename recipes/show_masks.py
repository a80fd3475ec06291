"""Pictures of masks drawn over the images they mask."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masklab.pipeline import Batch, DatasetLoader, Loader, Shapes
from masklab.transforms import MASKED, MASKS, THROWN, MaskContext, MaskOptions, PatchMask

__all__ = ["MASK_PICTURES", "build_mask_stage", "draw_mask_picture", "load_images", "overlay", "show_masks"]

MASK_COLOURS = {MASKED: (0.85, 0.1, 0.1), THROWN: (0.1, 0.3, 0.9)}
"""Masked cells red, thrown cells blue; visible cells keep their pixels."""

MASK_PICTURES = tuple(entry.name for entry in MASKS if entry.stage is not None)
"""The mask stages ``show-masks`` draws: every registered one (``none`` draws nothing)."""


def build_mask_stage(
    name: str,
    patch_size: int = 8,
    ratio: float | None = None,
    image_size: int = 64,
    num_samples: int = 1,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The stage ``show-masks --mask NAME`` draws: the registry's small-image options, ``ratio`` and any other
    of the mask's options (``show-masks --option KEY=VALUE``, its ``mask.*`` config keys) if given.

    Raises:
        ValueError: an option the mask does not have, naming the ones it has.
    """
    entry = MASKS[name]
    if entry.stage is None:
        raise ValueError(f"mask {name!r} has no stage to draw; choose one of {list(MASK_PICTURES)}")
    chosen = entry.small(patch_size, image_size)
    known = [f.name for f in fields(chosen) if f.name != "name"]
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise ValueError(
            f"mask {name!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(known)}"
        )
    chosen = replace(chosen, **(options or {}), **({} if ratio is None else {"ratio": ratio}))
    return entry.build(chosen, MaskContext(patch_size, image_size, num_samples))


def load_images(n: int, size: int, data: str | None = None, seed: int = 0) -> torch.Tensor:
    """``n`` images in ``[0, 1]``: the first of a ``.beton`` file, else of the built-in shapes."""
    if data is not None:
        loader = Loader(
            data, batch_size=n, resolution=size, order="sequential", scale=None, flip_p=0.0, drop_last=False
        )
    else:
        loader = DatasetLoader(
            Shapes(size=size, length=n, seed=seed),
            batch_size=n,
            resolution=size,
            order="sequential",
            scale=None,
            flip_p=0.0,
        )
    return next(iter(loader)).images


def overlay(images: torch.Tensor, states: torch.Tensor, alpha: float = 0.65) -> torch.Tensor:
    """Tint MASKED and THROWN pixels of ``(B, 3, H, W)`` images; ``states`` is ``(B, H, W)``."""
    out = images.clone()
    for state, colour in MASK_COLOURS.items():
        where = (states == state).unsqueeze(1)
        tint = torch.tensor(colour, dtype=images.dtype).view(1, 3, 1, 1)
        out = torch.where(where, (1 - alpha) * out + alpha * tint, out)
    return out


def _rows_for(stage, images: torch.Tensor, seed: int) -> list[tuple[str, torch.Tensor]]:
    out = stage(Batch(images=images, seed=seed))
    height, width = images.shape[-2:]
    if isinstance(out.mask, PatchMask):
        m = out.mask
        label = f"{m.grid[0]}x{m.grid[1]}: masked {m.num_masked}" + (f", thrown {m.num_thrown}" if m.num_thrown else "")
        return [("image", images), (label, overlay(images, m.to_pixels(height, width)))]
    if out.mix is not None:
        mix = out.mix
        return [
            ("query", images),
            ("partner", images[mix["partner"]]),
            (f"mixed, lambda {float(mix['lam'][0]):.2f}", mix["images"]),
        ]
    if "feature_masks" in out.extras:
        fm = out.extras["feature_masks"]
        rows = [("image", images)]
        for stride, mask in zip(fm.strides, fm.masks, strict=True):
            states = mask[:, 0].to(torch.uint8) * MASKED
            pixels = states.repeat_interleave(stride, 1).repeat_interleave(stride, 2)
            rows.append((f"stride {stride}, group 0", overlay(images, pixels)))
        return rows
    raise ValueError(f"{type(stage).__name__} emitted no mask to draw")


def draw_mask_picture(rows: list[tuple[str, torch.Tensor]], path: Path, title: str) -> None:
    """Save a grid of images to ``path``: a row per ``(label, images (N, 3, H, W) in [0, 1])``, under ``title``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows) + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(title + "  (red: masked, blue: thrown)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _guide(images: torch.Tensor, trained, patch_size: int, kind: str):
    """``(guide, images_in, patch_size)``: a trained ``(config, model)``'s guidance of ``kind`` (its
    normalisation applied to the images), or a random-init 4-block ViT's without one."""
    from masklab.objectives import ViTBackbone

    size = images.shape[-1]
    if trained is None:
        backbone = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=size, patch_size=patch_size, depth=4).eval()
        if kind == "saliency":
            return (lambda x, grid: backbone.saliency(x, grid)), images, patch_size
        if kind == "affinity":
            return (lambda x, grid: backbone.affinity(x)), images, patch_size
        return _random_init_model(backbone, kind).guidance(kind), images, patch_size
    cfg, model = trained
    if cfg.data.resolution != size:
        raise ValueError(f"the checkpoint was trained at {cfg.data.resolution} px; pass --size {cfg.data.resolution}")
    from masklab.transforms import Normalize

    from .build import patch_size_of

    images_in = Normalize(cfg.data.mean, cfg.data.std)(Batch(images=images)).images
    return model.guidance(kind), images_in, patch_size_of(cfg, model.backbone.family)


def _random_init_model(backbone, kind: str):
    """The first registered objective that offers ``kind`` of guidance (HPM's ``difficulty``), at random
    initialisation on ``backbone``: guidance that only an objective's own heads give."""
    from masklab.objectives import OBJECTIVES

    entry = next(e for e in OBJECTIVES if kind in e.guides and backbone.family in e.families)
    return entry.build(backbone, entry.small(), MaskOptions()).eval()


def heat_over(images: torch.Tensor, maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, Gh, Gw)`` maps in ``[0, 1]`` as a blue-to-orange heat map blended over ``(B, 3, H, W)`` images."""
    heat = maps.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return 0.5 * images + 0.5 * torch.stack([heat, heat * 0.4, 1 - heat], dim=1)


def _saliency_rows(
    mask: str, images: torch.Tensor, trained, patch_size: int, ratio: float | None, seed: int, options=None
):
    """Saliency of a trained model (or a random-init ViT) and the masks it drives (AMT's cache, refreshed)."""
    size = images.shape[-1]
    guide, images_in, patch_size = _guide(images, trained, patch_size, "saliency")
    grid = (size // patch_size, size // patch_size)
    stage = build_mask_stage(mask, patch_size, ratio, size, num_samples=len(images), options=options)
    stage.bind(guide)
    index = torch.arange(len(images))
    stage.refresh([Batch(images=images_in, index=index)], grid)
    out = stage(Batch(images=images, index=index, seed=seed))
    m = out.mask
    label = f"{m.grid[0]}x{m.grid[1]}: masked {m.num_masked}, thrown {m.num_thrown}"
    source = "trained saliency" if trained else "saliency (random init)"
    return [
        ("image", images),
        (source, heat_over(images, stage.cache, patch_size)),
        (label, overlay(images, m.to_pixels(size, size))),
    ]


def region_colours(regions: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """``(B, 3, size, size)``: one random colour per region id of ``(B, Gh, Gw)`` regions."""
    palette = torch.rand(regions[0].numel(), 3, generator=torch.Generator().manual_seed(seed))
    colours = palette[regions.cpu()].permute(0, 3, 1, 2)  # (B, 3, Gh, Gw)
    return colours.repeat_interleave(size // regions.shape[1], 2).repeat_interleave(size // regions.shape[2], 3)


def _affinity_rows(
    mask: str,
    images: torch.Tensor,
    trained,
    patch_size: int,
    ratio: float | None,
    seed: int,
    progress: tuple[float, ...],
    options=None,
):
    """Regions of a model's affinity tree (EHM) and the masks at several points of training."""
    size = images.shape[-1]
    guide, images_in, patch_size = _guide(images, trained, patch_size, "affinity")
    stage = build_mask_stage(mask, patch_size, ratio, size, options=options)
    stage.bind(guide)
    rows = [("image", images)]
    for t in progress:
        stage.set_progress(t)
        out = stage(Batch(images=images_in, seed=seed))
        regions = out.extras["regions"]
        count = stage.num_regions(regions[0].numel())
        rows.append((f"t={t:g}: {count} regions", 0.35 * images + 0.65 * region_colours(regions, size, seed)))
        rows.append((f"t={t:g}: masked {out.mask.num_masked}", overlay(images, out.mask.to_pixels(size, size))))
    return rows


def _guided_rows(
    mask: str,
    images: torch.Tensor,
    trained,
    patch_size: int,
    ratio: float | None,
    seed: int,
    progress: tuple[float, ...],
    kind: str,
    options=None,
):
    """A model's per-cell guidance map (e.g. HPM's predicted difficulty) as a heat map, and the masks it
    drives at each point of training (one draw, if the stage does not follow training progress)."""
    from masklab.objectives import minmax
    from masklab.transforms import ProgressAware

    size = images.shape[-1]
    guide, images_in, patch_size = _guide(images, trained, patch_size, kind)
    grid = (size // patch_size, size // patch_size)
    stage = build_mask_stage(mask, patch_size, ratio, size, options=options)
    stage.bind(guide)
    heat = minmax(guide(images_in, grid).float().cpu(), dims=(1, 2))
    source = f"trained {kind}" if trained else f"{kind} (random init)"
    rows = [("image", images), (source, heat_over(images, heat, patch_size))]
    for t in progress if isinstance(stage, ProgressAware) else (None,):
        if t is not None:
            stage.set_progress(t)
        m = stage(Batch(images=images_in, seed=seed)).mask
        label = ("" if t is None else f"t={t:g}: ") + f"masked {m.num_masked}"
        rows.append((label, overlay(images, m.to_pixels(size, size))))
    return rows


def show_masks(
    mask: str,
    out: Path,
    data: str | None = None,
    n: int = 8,
    size: int = 64,
    patch_size: int = 8,
    ratio: float | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
    progress: tuple[float, ...] = (0.1, 0.5, 0.9),
    trust_checkpoint: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Draw ``mask`` over ``n`` images and save the picture to ``out``.

    For a stage guided by saliency (``amt``'s cache, ``attmask`` read per batch) the masks follow the
    saliency of ``checkpoint``'s model (a random-init ViT without one), drawn as a heat
    map too. For one guided by affinity (``ehm``) the regions of the model's
    affinity tree and the masks are drawn at each training ``progress`` (the
    checkpoint's EMA teacher, or a random-init ViT). For one guided by a
    per-cell map of the objective's own (``hpm``: its predicted difficulty)
    the map is drawn as a heat map and the masks at each ``progress`` (the
    checkpoint's model, or a random-init one of an objective offering it).
    The checkpoint's weights and config are read without unpickling anything
    unless ``trust_checkpoint`` (see :func:`~masklab.recipes.train.load_trained`). ``options`` sets the
    mask's other options by their ``mask.*`` names (e.g. ``{"mask_patch_size": 16}``: AttMask or AMT on
    SimMIM's cells).
    """
    from masklab.transforms import RefreshesCache

    from .train import load_trained

    if n < 1:
        raise ValueError(f"-n (images to draw) must be at least 1, got {n}")
    stage = build_mask_stage(mask, patch_size, ratio, size, options=options)
    kind = MASKS[mask].guide
    images = load_images(n, size, data, seed)
    trained = load_trained(checkpoint, trust=trust_checkpoint) if checkpoint and kind else None
    offers = () if trained is None or not hasattr(trained[1], "guidance") else getattr(trained[1], "guides", (kind,))
    if trained is not None and kind not in offers:
        from masklab.objectives import compatibility

        cfg, model = trained
        guided = [name for name, support in compatibility().items() if mask in support.masks]
        raise ValueError(
            f"--mask {mask} needs a model's {kind} guidance, and checkpoint {checkpoint} holds a "
            f"{type(model).__name__} model (task {cfg.task!r}) that offers {' and '.join(offers) or 'none'}; give a "
            f"pretraining checkpoint (objectives {', '.join(guided)}), or no --checkpoint for a random-init ViT's"
        )
    if (
        kind is not None
        and not isinstance(stage, RefreshesCache)
        and not (progress and all(0 <= t <= 1 for t in progress))
    ):
        raise ValueError(f"progress values must lie in [0, 1], got {list(progress)}")
    if kind == "saliency" and isinstance(stage, RefreshesCache):  # AMT's per-image cache
        rows = _saliency_rows(mask, images, trained, patch_size, ratio, seed, options)
        title = f"{mask}: ratio={stage.ratio}, throw_ratio={stage.throw_ratio}, " + (
            "trained saliency" if trained else "random-init saliency"
        )
    elif kind == "affinity":
        rows = _affinity_rows(mask, images, trained, patch_size, ratio, seed, tuple(progress), options)
        title = f"{mask}: ratio={stage.ratio}, " + (
            "the checkpoint's affinity (its EMA teacher's, if any)" if trained else "random-init affinity"
        )
    elif kind is not None:
        rows = _guided_rows(mask, images, trained, patch_size, ratio, seed, tuple(progress), kind, options)
        title = f"{mask}: ratio={stage.ratio}, " + (f"the checkpoint's {kind}" if trained else f"random-init {kind}")
    else:
        rows = _rows_for(stage, images, seed)
        title = f"{mask}: {stage.extra_repr()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_mask_picture(rows, out, title)
    return out
