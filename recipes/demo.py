"""The demo: MAE pretraining of a tiny ViT on the built-in shapes, judged by kNN."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

__all__ = ["DEMO_OVERRIDES", "run_demo", "save_crop_picture", "write_shapes"]

logger = logging.getLogger(__name__)

DEMO_OVERRIDES = [
    "model.kwargs={depth: 4}",
    "data.batch_size=128",
    "data.num_workers=2",
    "optim.lr=1.5e-3",
    "optim.warmup_epochs=2",
    "run.log_every=10",
    "run.ckpt_every=100",
]
"""The default recipe (``mae``) shrunk to fit 2 CPU cores in under 10 minutes: a 4-block ViT-tiny, 30 epochs."""


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


def write_shapes(folder: Path, length: int = 4000, size: int = 32) -> dict[str, Path]:
    """The built-in shapes as ``.beton`` files in ``folder`` (written once): ``{"train": ..., "test": ...}``.

    The test split has a quarter of ``length`` images. Existing files are kept.
    """
    from masklab.pipeline import Shapes, write_dataset

    folder.mkdir(parents=True, exist_ok=True)
    suffix = "" if (length, size) == (4000, 32) else f"-{length}-{size}px"
    data = {"train": folder / f"shapes{suffix}.beton", "test": folder / f"shapes{suffix}-test.beton"}
    for split, path in data.items():
        if not path.exists():
            print(f"writing the built-in shapes {split} split to {path} ...")
            count = length if split == "train" else max(1, length // 4)
            write_dataset(Shapes(size=size, length=count, seed=0, split=split), path, progress=False)
    return data


def run_demo(
    out_dir: Path = Path("runs/demo"), device: str = "auto", epochs: int | None = None, extra: list[str] | None = None
) -> dict[str, float]:
    """Write ``shapes`` (once), pretrain MAE on it, compare kNN accuracy with random init.

    Saves the loss curve (``loss.png``), block masks over the images
    (``masks.png``) and crop boxes over their sources (``crops.png``).

    Returns:
        ``{"knn_trained", "knn_random", "seconds"}``.
    """
    from masklab.pipeline import Loader, Shapes

    from .config import load_config
    from .show_masks import show_masks
    from .train import evaluate_checkpoint, train

    start = time.perf_counter()
    data = write_shapes(out_dir)
    overrides = [
        *DEMO_OVERRIDES,
        f"data.train={data['train']}",
        f"data.test={data['test']}",
        f"run.out={out_dir / 'mae'}",
        "run.overwrite=true",  # a demo run starts afresh each time
        f"run.device={device}",
        f"run.epochs={epochs or 30}",
        *(extra or []),
    ]
    cfg = load_config("mae", overrides)
    print(
        f"pretraining MAE ({cfg.model.backbone}, {cfg.model.kwargs}, patch {cfg.model.patch_size}) for {cfg.run.epochs} epochs ..."
    )
    result = train(cfg)
    random = evaluate_checkpoint("random", "knn", ["task=pretrain", *overrides])["knn"]

    masks = show_masks("random", out_dir / "masks.png", data=str(data["train"]), n=8, size=32, patch_size=4)
    sources = next(iter(Loader(data["train"], batch_size=8, resolution=32, order="sequential", scale=None))).images
    batch = next(iter(Loader(data["train"], batch_size=8, resolution=32, order="sequential", seed=1)))
    save_crop_picture(sources, batch.crops, batch.flips, batch.images, out_dir / "crops.png")
    seconds = time.perf_counter() - start
    print(f"kNN accuracy (k={cfg.eval.knn_k}, {len(Shapes.classes)} classes, chance {1 / len(Shapes.classes):.3f}):")
    print(f"  MAE-pretrained encoder: {result.knn:.4f}")
    print(f"  same encoder, random init: {random:.4f}")
    print(f"loss curve: {cfg.run.out}/loss.png   masks: {masks}   crops: {out_dir / 'crops.png'}")
    print(f"demo took {seconds / 60:.1f} min")
    return {"knn_trained": float(result.knn), "knn_random": float(random), "seconds": seconds}
