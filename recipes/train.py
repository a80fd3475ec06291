"""The training loop: any (loader stages, backbone, objective) on Accelerate."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from masklab.pipeline import replace_atomically

from .build import (
    build_loader,
    build_model,
    build_optimizer,
    checkpoint_dir,
    encoder_of,
    family_of,
    sync_batchnorm,
)
from .config import TrainConfig, save_config, to_dict

__all__ = [
    "TrainResult",
    "evaluate_checkpoint",
    "evaluate_encoder",
    "evaluate_knn",
    "latest_checkpoint",
    "load_trained",
    "plot_losses",
    "refresh_caches",
    "save_checkpoint",
    "train",
]

logger = logging.getLogger(__name__)
CSV_FIELDS = ("update", "epoch", "loss", "lr", "images_per_s", "masked_fraction", "thrown_fraction")


@dataclass
class TrainResult:
    """What a run produced."""

    out: Path
    updates: int
    model: torch.nn.Module | None = None  # the trained module (unwrapped)
    losses: list[float] = field(default_factory=list)  # per update, averaged over ranks
    knn: float | None = None  # kNN accuracy of the encoder at the end
    checkpoint: Path | None = None
    indices: torch.Tensor | None = None  # dataset indices this rank trained on (run.record_indices)
    stages: torch.nn.Module | None = None  # the loader's stage chain, with its state (AMT's cache)


def _mixed_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cpu = cfg.run.device == "cpu" or (cfg.run.device == "auto" and not torch.cuda.is_available())
    device = torch.device("cpu") if cpu else torch.device("cuda" if cfg.run.device == "auto" else cfg.run.device)
    log_with = []
    try:
        import tensorboard  # noqa: F401

        log_with.append("tensorboard")
    except ImportError:
        logger.info("tensorboard is not installed: metrics go to the CSV only")
    return Accelerator(
        cpu=cpu,
        mixed_precision=_mixed_precision(cfg.optim.mixed_precision, device),
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=log_with or None,
        project_dir=cfg.run.out,
    )


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("ckpt-*.pt"))
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], folder: Path, update: int, keep: int) -> Path:
    """Write ``ckpt-UPDATE.pt`` under a temporary name, rename it, keep the last ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{update:08d}.pt"
    replace_atomically(lambda tmp: torch.save(state, tmp), path)
    for old in sorted(folder.glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
    return path


def plot_losses(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["update"]) for r in rows], [float(r["loss"]) for r in rows], lw=1)
    ax.set_xlabel("update")
    ax.set_ylabel("loss")
    ax.set_title(png_path.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _keep_rows_until(csv_path: Path, update: int) -> None:
    """On resume, drop rows a killed run logged after its last checkpoint."""
    if not csv_path.exists():
        return
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if int(r["update"]) <= update]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    replace_atomically(write, csv_path)


def bind_guidance(stages, objective) -> int:
    """Hand model-guided stages their guide: the objective's ``guidance(kind)``.

    A stage that needs a model (AMT's saliency, EHM's affinity) has a
    ``guide_kind`` attribute and a ``bind(guide)`` method; stages never import
    a model, the loop binds them. Returns how many stages were bound.
    """
    bound = 0
    for stage in stages:
        kind = getattr(stage, "guide_kind", None)
        if kind is None:
            continue
        if not hasattr(objective, "guidance"):
            raise ValueError(
                f"{type(stage).__name__} needs {kind!r} guidance but {type(objective).__name__} offers none"
            )
        stage.bind(objective.guidance(kind))
        bound += 1
    return bound


def refresh_caches(cfg: TrainConfig, stages, objective, accelerator, family: str, epoch: int) -> int:
    """Refresh the caches of stages due at ``epoch`` (AMT's saliency), each rank its shard, gathered.

    Returns how many stages were refreshed.
    """
    due = [s for s in stages if hasattr(s, "refresh_due") and s.refresh_due(epoch, cfg.run.epochs)]
    if not due:
        return 0
    from masklab.transforms._sampling import patch_grid

    from .build import patch_size_of

    patch = patch_size_of(cfg, family)
    grid = patch_grid(cfg.data.resolution, cfg.data.resolution, patch)
    batches = build_loader(
        cfg, "train", accelerator.device, family, distributed=accelerator.num_processes > 1, train=False
    )

    def gather(index: torch.Tensor, maps: torch.Tensor):
        return accelerator.gather(index), accelerator.gather(maps)

    start = time.perf_counter()
    for stage in due:
        stage.refresh(batches, grid, gather if accelerator.num_processes > 1 else None)
    logger.info("refreshed %d cache(s) at epoch %d in %.1f s", len(due), epoch, time.perf_counter() - start)
    return len(due)


def set_progress(stages, progress: float) -> None:
    """Tell stages that evolve with training (``set_progress``) where training is, in [0, 1]."""
    for stage in stages:
        if hasattr(stage, "set_progress"):
            stage.set_progress(min(max(progress, 0.0), 1.0))


def step_teachers(objective, progress: float) -> int:
    """Step every EMA teacher of ``objective`` after an update.

    An objective with teachers exposes ``teachers()``: ``(EMATeacher, student)``
    pairs. Returns how many were stepped.
    """
    pairs = objective.teachers() if hasattr(objective, "teachers") else []
    for teacher, student in pairs:
        teacher.update(student, progress)
    return len(pairs)


def evaluate_encoder(
    cfg: TrainConfig,
    encoder,
    device: torch.device,
    family: str,
    kinds: tuple[str, ...] = ("knn",),
    loaders: tuple[Any, Any] | None = None,
) -> dict[str, float]:
    """Accuracy of ``encoder``'s pooled features, train split against test split, for each of ``kinds``.

    ``kinds`` holds ``knn`` (``cfg.eval.knn_k``, ``knn_temperature``) and/or
    ``linear`` (a probe of ``cfg.eval.linear_epochs`` epochs at ``linear_lr``);
    the features are extracted once for all of them. ``loaders``: the
    (train, test) evaluation loaders to reuse (an FFCV loader compiles its
    pipeline once, a few seconds on a CPU); built from ``cfg`` when ``None``.
    """
    from .evaluate import extract_features, knn_accuracy, linear_probe_accuracy

    if not kinds or any(k not in ("knn", "linear") for k in kinds):
        raise ValueError(f"evaluation must be knn and/or linear, got {list(kinds)}")
    was_training = getattr(encoder, "training", False)
    if hasattr(encoder, "eval"):
        encoder.eval()
    if loaders is None:
        loaders = tuple(build_loader(cfg, split, device, family, train=False) for split in ("train", "test"))
    train_set, test_set = (extract_features(encoder, loader) for loader in loaders)
    if was_training:
        encoder.train()
    scores = {}
    if "knn" in kinds:
        scores["knn"] = knn_accuracy(*train_set, *test_set, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    if "linear" in kinds:
        scores["linear"] = linear_probe_accuracy(
            *train_set, *test_set, epochs=cfg.eval.linear_epochs, lr=cfg.eval.linear_lr
        )
    return scores


def evaluate_knn(cfg: TrainConfig, encoder, device: torch.device, family: str) -> float:
    """kNN accuracy of ``encoder``'s pooled features, train split against test split."""
    return evaluate_encoder(cfg, encoder, device, family, ("knn",))["knn"]


def _resume_path(cfg: TrainConfig) -> Path | None:
    if cfg.run.resume is None:
        return None
    if cfg.run.resume == "auto":
        return latest_checkpoint(checkpoint_dir(cfg))
    path = Path(cfg.run.resume)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def train(cfg: TrainConfig) -> TrainResult:
    """Run ``cfg``: pretrain or train a classifier, checkpoint, log, evaluate kNN at the end."""
    from accelerate.utils import set_seed
    from timm.scheduler import CosineLRScheduler
    from tqdm.auto import tqdm

    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    out = Path(cfg.run.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    set_seed(cfg.run.seed)
    model = sync_batchnorm(cfg, build_model(cfg), accelerator.device, accelerator.num_processes)
    family = family_of(model)
    loader = build_loader(cfg, "train", accelerator.device, family, distributed=accelerator.num_processes > 1)
    updates_per_epoch = max(1, len(loader) // cfg.optim.grad_accum)
    total = cfg.run.epochs * updates_per_epoch
    if cfg.run.max_steps is not None:
        total = min(total, cfg.run.max_steps)
    optimizer = build_optimizer(cfg, model)
    warmup = int(round(cfg.optim.warmup_epochs * updates_per_epoch))
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total),
        lr_min=cfg.optim.min_lr,
        warmup_t=min(warmup, max(0, total - 1)),
        warmup_lr_init=cfg.optim.lr * 0.01,
        t_in_epochs=False,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    update = 0
    resume = _resume_path(cfg)
    csv_path = out / "metrics.csv"
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=False)
        raw.load_state_dict(state["model"])
        optimizer.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        loader.chain.load_state_dict(state["stages"])
        torch.set_rng_state(state["rng"]["torch"])
        update = int(state["update"])
        if main:
            _keep_rows_until(csv_path, update)
        logger.info("resumed from %s at update %d", resume, update)
    scheduler.step_update(update)
    if main:
        accelerator.init_trackers("masklab", config=_flat(to_dict(cfg)))
        if not csv_path.exists() or resume is None:
            with open(csv_path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_FIELDS).writeheader()

    def snapshot() -> dict[str, Any]:
        return {
            "model": raw.state_dict(),
            "optimizer": optimizer.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "stages": loader.chain.state_dict(),
            "update": update,
            "rng": {"torch": torch.get_rng_state()},
            "config": to_dict(cfg),
        }

    progress = tqdm(
        total=total, initial=update, disable=not (main and cfg.run.progress), desc=out.name, dynamic_ncols=True
    )
    pending: list[dict[str, Any]] = []
    recorded: list[torch.Tensor] = []
    losses: list[float] = []
    last_path: Path | None = None
    tick, seen = time.perf_counter(), 0
    stop_at = total if cfg.run.stop_at is None else min(total, cfg.run.stop_at)
    bind_guidance(loader.chain, raw)
    set_progress(loader.chain, update / total)
    model.train()
    while update < stop_at:
        epoch = loader.epoch
        if loader.step == 0:
            refresh_caches(cfg, loader.chain, raw, accelerator, family, epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                result = model(batch)
                accelerator.backward(result.loss)
                if accelerator.sync_gradients and cfg.optim.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seen += len(batch)
            if cfg.run.record_indices:
                recorded.append(batch.index.cpu())
            if not accelerator.sync_gradients:
                continue
            update += 1
            scheduler.step_update(update)
            step_teachers(raw, update / total)
            set_progress(loader.chain, update / total)
            mask = batch.mask
            pending.append(
                {
                    "update": update,
                    "epoch": epoch,
                    "loss": result.loss.detach(),
                    "lr": optimizer.param_groups[0]["lr"],
                    "masked_fraction": mask.num_masked / mask.num_cells if mask is not None else 0.0,
                    "thrown_fraction": mask.num_thrown / mask.num_cells if mask is not None else 0.0,
                }
            )
            if len(pending) >= cfg.run.log_every or update >= stop_at or update % cfg.run.ckpt_every == 0:
                # One host sync per log interval, not per step.
                values = accelerator.reduce(torch.stack([p["loss"] for p in pending]), reduction="mean").tolist()
                now = time.perf_counter()
                rate = seen * accelerator.num_processes / (now - tick)
                tick, seen = now, 0
                for row, value in zip(pending, values, strict=True):
                    row.update(loss=value, images_per_s=rate)
                    losses.append(value)
                if main:
                    with open(csv_path, "a", newline="") as f:
                        csv.DictWriter(f, fieldnames=CSV_FIELDS).writerows(pending)
                    accelerator.log({"loss": values[-1], "lr": pending[-1]["lr"], "images_per_s": rate}, step=update)
                progress.update(len(pending))
                progress.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{rate:.0f}")
                pending = []
            if update % cfg.run.ckpt_every == 0 or update >= stop_at:
                if main:
                    last_path = save_checkpoint(snapshot(), checkpoint_dir(cfg), update, cfg.run.keep)
                accelerator.wait_for_everyone()
            if update >= stop_at:
                break
        if update >= stop_at:
            break
    progress.close()

    result = TrainResult(out=out, updates=update, model=raw, losses=losses, checkpoint=last_path, stages=loader.chain)
    if recorded:
        result.indices = torch.cat(recorded)
    if main:
        plot_losses(csv_path, out / "loss.png")
    if cfg.eval.at_end and update >= total and main:
        model.eval()
        result.knn = evaluate_knn(cfg, encoder_of(raw), accelerator.device, family)
        (out / "eval.json").write_text(json.dumps({"knn": result.knn, "updates": update}, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = "null" if value is None else value
        else:
            flat[name] = str(value)
    return flat


def load_trained(checkpoint: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()):
    """``(config, model)`` of a checkpoint (its config, then ``overrides``), weights loaded, in eval mode.

    ``checkpoint`` may be ``random``: the model of ``overrides``' config at random initialisation.
    """
    from omegaconf import OmegaConf

    from .config import load_config

    if str(checkpoint) == "random":
        state = None
        cfg = load_config(None, list(overrides))
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=False)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.config.yaml")
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(state["config"])))
        try:
            cfg = load_config(tmp, list(overrides))
        finally:
            tmp.unlink()
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state["model"])
    return cfg, model.eval()


def evaluate_checkpoint(
    checkpoint: str | os.PathLike, kind: str = "knn", overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, float]:
    """kNN or linear-probe accuracy of a checkpoint's encoder (its config, then ``overrides``).

    ``checkpoint`` may also be ``random``: the encoder of ``overrides``'
    config at random initialisation (the baseline a trained one must beat).
    """
    if kind not in ("knn", "linear"):
        raise ValueError(f"evaluation must be knn or linear, got {kind!r}")
    cfg, model = load_trained(checkpoint, overrides)
    device = (
        torch.device("cpu")
        if cfg.run.device in ("auto", "cpu") and not torch.cuda.is_available()
        else torch.device("cuda" if cfg.run.device == "auto" else cfg.run.device)
    )
    model.to(device)
    return evaluate_encoder(cfg, encoder_of(model), device, family_of(model), (kind,))
