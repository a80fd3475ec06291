"""The demo: the built-in shapes data through the FFCV loader and its on-device stages."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

__all__ = ["run_demo", "save_crop_picture"]

logger = logging.getLogger(__name__)


def save_crop_picture(
    sources: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, crops: torch.Tensor, path: Path
) -> None:
    """Draw each source image with its crop box (red; dashed if flipped) above the crop it gave."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = sources.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.0), squeeze=False)
    for i in range(n):
        top, bottom = axes[0, i], axes[1, i]
        top.imshow(sources[i].permute(1, 2, 0).cpu().numpy())
        x0, y0, x1, y1 = boxes[i].tolist()
        style = "--" if bool(flips[i]) else "-"
        top.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="red", lw=1.5, ls=style))
        bottom.imshow(crops[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("source + box", fontsize=8)
    axes[1, 0].set_ylabel("crop (flipped\nif dashed)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    out_dir: Path = Path("runs/demo"), device: str = "cpu", batch_size: int = 128, epochs: int = 2
) -> dict[str, float]:
    """Write ``shapes`` (once), stream ``epochs`` epochs through the loader, report, draw.

    Saves the crop boxes over their sources (``crops.png``) and block masks
    over the images (``masks.png``) in ``out_dir``.

    Returns:
        ``{"images": ..., "images_per_s": ...}`` for the epochs after the first
        (the first pays numba's compile time).
    """
    from masklab.pipeline import Loader, Shapes, read_info, write_dataset
    from masklab.transforms import Normalize

    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "shapes.beton"
    if not data.exists():
        print(f"writing the built-in shapes data to {data} ...")
        write_dataset(Shapes(size=32, length=4000, seed=0), data, progress=False)
    print(read_info(data))

    loader = Loader(
        data, stages=[Normalize((0.5,) * 3, (0.5,) * 3)], batch_size=batch_size, resolution=32, device=device, seed=0
    )
    seen, timed, start = 0, 0.0, time.perf_counter()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        n = sum(len(batch) for batch in loader)
        elapsed = time.perf_counter() - t0
        print(
            f"epoch {epoch}: {n} images in {elapsed:.2f} s ({n / elapsed:.0f} img/s){' (includes numba compile)' if epoch == 0 else ''}"
        )
        if epoch > 0:
            seen, timed = seen + n, timed + elapsed
    total = time.perf_counter() - start

    # One sequential batch without crops gives the sources the boxes refer to.
    sources = next(
        iter(Loader(data, batch_size=8, resolution=32, device=device, order="sequential", scale=None, flip_p=0.0))
    ).images
    batch = next(iter(Loader(data, batch_size=8, resolution=32, device=device, order="sequential", seed=1)))
    picture = out_dir / "crops.png"
    save_crop_picture(sources, batch.crops, batch.flips, batch.images, picture)
    from masklab.recipes.show_masks import show_masks

    masks = show_masks("block", out_dir / "masks.png", data=str(data), n=8, size=32, patch_size=4)
    rate = seen / timed if timed else float("nan")
    print(f"streamed {epochs} epochs in {total:.1f} s; after the first: {rate:.0f} img/s on {device}")
    print(f"crop boxes drawn over their sources: {picture}")
    print(f"block masks drawn over the images: {masks}")
    return {"images": float(seen), "images_per_s": rate}
