"""Pictures of masks drawn over the images they mask."""

from __future__ import annotations

from pathlib import Path

import torch

from masklab.pipeline import Batch, DatasetLoader, Loader, Shapes
from masklab.transforms import (
    MASKED,
    THROWN,
    BlockMask,
    FeatureMask,
    MixMask,
    PatchMask,
    RandomMask,
    SimMIMMask,
)

__all__ = ["MASK_PICTURES", "build_mask_stage", "draw_mask_picture", "load_images", "overlay", "show_masks"]

MASK_COLOURS = {MASKED: (0.85, 0.1, 0.1), THROWN: (0.1, 0.3, 0.9)}
"""Masked cells red, thrown cells blue; visible cells keep their pixels."""

MASK_PICTURES = ("random", "block", "simmim", "mixmask", "feature")


def build_mask_stage(name: str, patch_size: int = 8, ratio: float | None = None, image_size: int = 64):
    """The stage ``show-masks --mask NAME`` draws, with defaults that suit small images."""
    if name == "random":
        return RandomMask(0.75 if ratio is None else ratio, patch_size)
    if name == "block":
        return BlockMask(0.4 if ratio is None else ratio, patch_size)
    if name == "simmim":
        return SimMIMMask(0.6 if ratio is None else ratio, mask_patch_size=2 * patch_size, patch_size=patch_size)
    if name == "mixmask":
        return MixMask(grid=max(1, image_size // (2 * patch_size)), ratio=0.5 if ratio is None else ratio)
    if name == "feature":
        return FeatureMask(
            strides=(patch_size, 2 * patch_size, 4 * patch_size), ratio=0.5 if ratio is None else ratio, groups=2
        )
    raise ValueError(f"unknown mask {name!r}; choose one of {list(MASK_PICTURES)}")


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


def show_masks(
    mask: str,
    out: Path,
    data: str | None = None,
    n: int = 8,
    size: int = 64,
    patch_size: int = 8,
    ratio: float | None = None,
    seed: int = 0,
) -> Path:
    """Draw ``mask`` over ``n`` images and save the picture to ``out``."""
    stage = build_mask_stage(mask, patch_size, ratio, size)
    images = load_images(n, size, data, seed)
    rows = _rows_for(stage, images, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_mask_picture(rows, out, f"{mask}: {stage.extra_repr()}")
    return out
