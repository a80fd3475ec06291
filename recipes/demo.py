"""The demo: MAE pretraining of a tiny ViT on the built-in shapes, judged by a linear probe and kNN.

``make demo`` (``masklab demo``) writes the built-in shapes once, pretrains
the default recipe (MAE) through the FFCV loader and its on-device stages,
then evaluates the trained encoder and the *same* encoder at its random
initialisation (the weights training started from) with one feature
extraction each: kNN and a linear probe on frozen, mean-pooled features.
The figures go to ``demo.json`` in the output folder (one entry per seed,
the study's format: ``runs["mae"]`` and ``runs["random_vit"]``), from which
``masklab demo --readme README.md`` writes the README's demo section.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEMO_OVERRIDES",
    "MEAN_POOLED_VIT",
    "README_FIGURES",
    "RunScores",
    "crop_picture_inputs",
    "demo_markdown",
    "run_demo",
    "save_crop_picture",
    "write_shapes",
]

logger = logging.getLogger(__name__)

README_FIGURES = "docs/demo.json"

DEMO_EPOCHS = 30

MEAN_POOLED_VIT = "model.kwargs={depth: 4, global_pool: avg, fc_norm: false}"
"""The demo's and the study's ViT: timm's ViT-tiny with 4 blocks, read through the mean of its patch tokens
after the final norm (timm's ``global_pool: avg`` with ``fc_norm: false``: the same weights as the default
class-token model, so nothing changes in training; only what evaluation and fine-tuning read)."""

DEMO_OVERRIDES = [
    MEAN_POOLED_VIT,
    "data.batch_size=128",
    "data.num_workers=2",
    "optim.lr=1.5e-3",
    "optim.warmup_epochs=2",
    "run.log_every=10",
    "run.ckpt_every=100",
    "eval.at_end=false",
]
"""The default recipe (``mae``) shrunk to fit 2 CPU cores in under 10 minutes: a 4-block ViT-tiny, 30 epochs.

The encoder's features are the mean of its patch tokens after the final norm
(timm's ``global_pool: avg`` with ``fc_norm: false``, which changes nothing in
training), as MAE reads its encoder for fine-tuning, rather than timm's default
class token, which no MAE loss reads directly (on this demo's seeds 0 and 1 the
class token's linear-probe gain over random init varied several times more
between seeds than the mean-pooled one's). The loop's own end-of-run kNN is off:
the demo evaluates kNN and the linear probe from one extraction."""


@dataclass
class RunScores:
    """Per arm, per seed: ``{"knn", "linear", "updates", "seconds"}``; plus the settings used.

    The demo's ``demo.json`` and the study's ``results.json`` (``masklab study``) hold one each.
    """

    runs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunScores:
        """Scores as :meth:`save` wrote them."""
        data = json.loads(Path(path).read_text())
        return cls(runs=data["runs"], settings=data["settings"])

    @classmethod
    def load_or_new(cls, path: str | os.PathLike, settings: dict[str, Any]) -> RunScores:
        """The runs saved at ``path`` if they were made with ``settings``, else none (a fresh start)."""
        path = Path(path)
        previous = cls.load(path) if path.exists() else None
        if previous is not None and previous.settings == settings:
            return previous
        return cls(settings=settings)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``{"settings", "runs"}`` as JSON under a temporary name, then rename it."""
        from masklab.pipeline import write_text_atomically

        write_text_atomically(Path(path), json.dumps({"settings": self.settings, "runs": self.runs}, indent=1))


def crop_picture_inputs(
    path: str | Path, n: int = 8, resolution: int = 32, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sources, boxes, flips, crops)`` for :func:`save_crop_picture`: the first ``n`` images of ``path``.

    ``sources`` are the whole images, *unflipped*, so each box is drawn in
    the coordinates it was cut in; ``crops`` are what the training loader
    (random crop and flip, ``seed``) gives for the same images.
    """
    from masklab.pipeline import Loader

    whole = Loader(path, batch_size=n, resolution=resolution, order="sequential", scale=None, flip_p=0.0)
    cropped = Loader(path, batch_size=n, resolution=resolution, order="sequential", seed=seed)
    sources, batch = next(iter(whole)), next(iter(cropped))
    if not torch.equal(sources.index, batch.index):
        raise RuntimeError("the crop picture's two loaders read different images")
    return sources.images, batch.crops, batch.flips, batch.images


def save_crop_picture(
    sources: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, crops: torch.Tensor, path: Path
) -> None:
    """Draw each unflipped source image with its crop box (red; dashed if flipped) above the crop it gave."""
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


def write_shapes(folder: Path, length: int = 4000, size: int = 32, background: str = "textured") -> dict[str, Path]:
    """The built-in shapes as ``.beton`` files in ``folder`` (written once): ``{"train": ..., "test": ...}``.

    The test split has a quarter of ``length`` images; ``background`` is :class:`~masklab.pipeline.Shapes`'s.
    Existing files are kept.
    """
    from masklab.pipeline import Shapes, write_dataset

    folder.mkdir(parents=True, exist_ok=True)
    suffix = "" if (length, size) == (4000, 32) else f"-{length}-{size}px"
    suffix += "" if background == "textured" else f"-{background}"
    data = {"train": folder / f"shapes{suffix}.beton", "test": folder / f"shapes{suffix}-test.beton"}
    for split, path in data.items():
        if not path.exists():
            print(f"writing the built-in shapes {split} split to {path} ...")
            count = length if split == "train" else max(1, length // 4)
            source = Shapes(size=size, length=count, seed=0, split=split, background=background)
            write_dataset(source, path, progress=False)
    return data


def _run_dir(out_dir: Path, seed: int) -> Path:
    return out_dir / ("mae" if seed == 0 else f"mae-seed{seed}")


def run_demo(
    out_dir: Path = Path("runs/demo"),
    device: str = "auto",
    epochs: int | None = None,
    extra: Sequence[str] | None = None,
    seed: int = 0,
    pictures: bool = True,
    length: int = 4000,
) -> RunScores:
    """Write ``shapes`` (once), pretrain MAE on it, compare its encoder with the same encoder at random init.

    ``length`` training images (the test split has a quarter); ``make demo`` and the README use 4000.

    Both encoders are evaluated by kNN and a linear probe on the test split.
    The scores are added to ``out_dir/demo.json`` under ``seed`` (a run with
    other settings starts the file afresh). With ``pictures``, also saves the
    block masks over the images (``masks.png``) and the crop boxes over their
    sources (``crops.png``); the loop saves the loss curve (``loss.png``).

    Returns:
        the :class:`RunScores` of ``demo.json``
        (``runs["mae"][str(seed)]`` and ``runs["random_vit"][str(seed)]``:
        ``{"knn", "linear", "updates", "seconds"}``).
    """
    if length < 4:
        raise ValueError(f"length={length}: the demo needs at least 4 training images (the test split has a quarter)")

    from masklab.pipeline import Shapes

    from .build import build_loader, build_model, encoder_of, family_of
    from .config import load_config
    from .train import evaluate_encoder, train

    start = time.perf_counter()
    data = write_shapes(out_dir, length=length)
    settings_overrides = [*DEMO_OVERRIDES, f"run.epochs={epochs or DEMO_EPOCHS}", *(extra or [])]
    overrides = [
        *settings_overrides,
        f"data.train={data['train']}",
        f"data.test={data['test']}",
        f"data.length={length}",  # in the settings as "length"
        f"run.out={_run_dir(out_dir, seed)}",
        "run.overwrite=true",  # a demo run starts afresh each time
        f"run.device={device}",
        f"run.seed={seed}",
    ]
    cfg = load_config("mae", overrides)
    print(
        f"pretraining MAE ({cfg.model.backbone}, {cfg.model.kwargs}, patch {cfg.model.patch_size}) "
        f"for {cfg.run.epochs} epochs, seed {seed} ..."
    )
    result = train(cfg)
    train_seconds = time.perf_counter() - start
    trained = result.model.eval()
    family, where = family_of(trained), next(trained.parameters()).device
    torch.manual_seed(seed)  # train() seeded the same way before building: these are its initial weights
    initial = build_model(cfg).to(where).eval()
    loaders = tuple(build_loader(cfg, split, where, family, train=False) for split in ("train", "test"))
    kinds = ("knn", "linear")
    scores = {
        "mae": {**evaluate_encoder(cfg, encoder_of(trained), where, family, kinds, loaders), "updates": result.updates},
        "random_vit": {**evaluate_encoder(cfg, encoder_of(initial), where, family, kinds, loaders), "updates": 0},
    }

    if pictures:
        from .show_masks import show_masks

        show_masks("random", out_dir / "masks.png", data=str(data["train"]), n=8, size=32, patch_size=4)
        save_crop_picture(*crop_picture_inputs(data["train"]), out_dir / "crops.png")
    seconds = time.perf_counter() - start
    scores["mae"].update(seconds=seconds, train_seconds=train_seconds)
    scores["random_vit"]["seconds"] = 0.0

    settings = {"epochs": cfg.run.epochs, "length": length, "overrides": settings_overrides}
    demo = RunScores.load_or_new(out_dir / "demo.json", settings)
    for name, values in scores.items():
        demo.runs.setdefault(name, {})[str(seed)] = values
    demo.save(out_dir / "demo.json")

    mae, random = scores["mae"], scores["random_vit"]
    print(
        f"\nfrozen features on the {cfg.data.length // 4} test images "
        f"({len(Shapes.classes)} classes, chance {1 / len(Shapes.classes):.3f}):"
    )
    print(f"  {'':28}{'kNN (k=' + str(cfg.eval.knn_k) + ')':>12}{'linear probe':>14}")
    print(f"  {'MAE-pretrained encoder':28}{mae['knn']:>12.4f}{mae['linear']:>14.4f}")
    print(f"  {'same encoder, random init':28}{random['knn']:>12.4f}{random['linear']:>14.4f}")
    print(gain_line(mae, random))
    print(f"loss curve: {cfg.run.out}/loss.png   masks: {out_dir / 'masks.png'}   crops: {out_dir / 'crops.png'}")
    print(f"figures: {out_dir / 'demo.json'}   demo took {seconds / 60:.1f} min")
    return demo


def gain_line(trained: dict[str, float], random: dict[str, float]) -> str:
    """One line saying what pretraining gained: the linear probe's difference, and kNN's beside it."""
    linear, knn = trained["linear"] - random["linear"], trained["knn"] - random["knn"]
    return f"pretraining gain: {100 * linear:+.1f} points of linear-probe accuracy (kNN: {100 * knn:+.1f} points)"


def demo_markdown(result: RunScores) -> str:
    """The README's demo paragraph and table, from a ``demo.json`` (:class:`RunScores`)."""
    trained, random = result.runs["mae"], result.runs["random_vit"]
    seeds = sorted(trained, key=int)
    gains = [trained[s]["linear"] - random[s]["linear"] for s in seeds]
    minutes = [trained[s]["seconds"] / 60 for s in seeds]
    lines = [
        f"Measured on this project's 2-core CPU machine ({trained[seeds[0]]['updates']} updates, "
        f"{statistics.mean(minutes):.1f} min a run on average, slowest {max(minutes):.1f} min; the first seed's "
        "run also writes the data and draws the pictures), accuracy on the 1000 test images (8 classes, chance 0.125):",
        "",
        "| seed | kNN, pretrained | kNN, random init | linear, pretrained | linear, random init | linear gain |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, gain in zip(seeds, gains, strict=True):
        t, r = trained[seed], random[seed]
        lines.append(
            f"| {seed} | {t['knn']:.3f} | {r['knn']:.3f} | {t['linear']:.3f} | {r['linear']:.3f} | "
            f"{100 * gain:+.1f} pts |"
        )
    lines += [
        "",
        f"The linear probe gains {100 * min(gains):.1f} to {100 * max(gains):.1f} points over random init "
        f"(mean {100 * statistics.mean(gains):.1f}).",
        "",
    ]
    return "\n".join(lines)
