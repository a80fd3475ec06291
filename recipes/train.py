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

from masklab.objectives.protocols import HasTeachers, OffersGuidance
from masklab.pipeline import replace_atomically
from masklab.transforms.protocols import GuidedStage, ProgressAware, RefreshesCache

from .build import (
    build_loader,
    build_model,
    build_optimizer,
    checkpoint_dir,
    encoder_of,
    family_of,
    sync_batchnorm,
)
from .checkpoint import Checkpoint, CheckpointError, checkpoint_backbone, fit_weights, save_checkpoint
from .checkpoint import load_checkpoint as read_checkpoint
from .config import TrainConfig, save_config, to_dict
from .run_folder import RunLock, check_resumed_config, find_resume, prepare_fresh_run

__all__ = [
    "TrainResult",
    "evaluate_checkpoint",
    "evaluate_encoder",
    "evaluate_knn",
    "load_trained",
    "plot_losses",
    "refresh_caches",
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
    """Hand each :class:`~masklab.transforms.protocols.GuidedStage` its guide: the objective's ``guidance(kind)``.

    Stages never import a model; the loop binds them. Returns how many stages were bound.

    Raises:
        ValueError: a stage needs guidance and the objective offers none.
    """
    bound = 0
    for stage in stages:
        if not isinstance(stage, GuidedStage):
            continue
        if not isinstance(objective, OffersGuidance):
            raise ValueError(
                f"{type(stage).__name__} needs {stage.guide_kind!r} guidance but {type(objective).__name__} offers none"
            )
        stage.bind(objective.guidance(stage.guide_kind))
        bound += 1
    return bound


def refresh_caches(cfg: TrainConfig, stages, objective, accelerator, family: str, epoch: int) -> int:
    """Refresh each :class:`~masklab.transforms.protocols.RefreshesCache` stage due at ``epoch``
    (AMT's saliency), each rank its shard, gathered. Returns how many stages were refreshed."""
    due = [s for s in stages if isinstance(s, RefreshesCache) and s.refresh_due(epoch, cfg.run.epochs)]
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
    """Tell each :class:`~masklab.transforms.protocols.ProgressAware` stage where training is, in [0, 1]."""
    for stage in stages:
        if isinstance(stage, ProgressAware):
            stage.set_progress(min(max(progress, 0.0), 1.0))


def step_teachers(objective, progress: float) -> int:
    """Step every EMA teacher of a :class:`~masklab.objectives.protocols.HasTeachers` objective after an update.

    Returns how many were stepped.
    """
    pairs = objective.teachers() if isinstance(objective, HasTeachers) else []
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


TRAINING_STATE = ("optimizer", "scheduler", "loader", "stages", "rng")


def _prepare_run(cfg: TrainConfig, main: bool, lock: RunLock) -> Checkpoint | None:
    """Lock the run folder, read the checkpoint to resume and check it against ``cfg``, or clear the
    folder for a fresh run; write ``config.yaml`` only once all of that passed. Returns the checkpoint."""
    out = Path(cfg.run.out)
    if cfg.run.resume is not None and cfg.run.overwrite:
        raise ValueError(
            f"run.resume={cfg.run.resume!r} and run.overwrite=true: overwrite deletes the checkpoints a resume "
            "reads; give one of --resume and --overwrite"
        )
    if main:
        lock.acquire()
    resume = find_resume(cfg, announce=main)
    if resume is not None:
        check_resumed_config(resume, cfg)
        lacking = [key for key in TRAINING_STATE if key not in resume.state]
        if resume.update is None or lacking:
            raise CheckpointError(
                f"checkpoint {resume.path} holds weights but not a training state to resume "
                f"(missing: {lacking or ['update']})"
            )
    if main:
        if resume is None:
            prepare_fresh_run(out, cfg.run.overwrite)
        replace_atomically(lambda tmp: save_config(cfg, tmp), out / "config.yaml")
    return resume


def _agree(accelerator, prepare):
    """``prepare()`` on every process; if any process fails, every process raises (none waits forever)."""
    try:
        result, failure = prepare(), None
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


def train(cfg: TrainConfig) -> TrainResult:
    """Run ``cfg``: pretrain or train a classifier, checkpoint, log, evaluate kNN at the end.

    The main process holds a lock on ``cfg.run.out`` while it runs. A fresh
    run into a folder holding a previous run's outputs is refused unless
    ``run.overwrite``; a resume is refused if its config changes the
    checkpoint's schedule, model or data.
    """
    accelerator = make_accelerator(cfg)
    lock = RunLock(cfg.run.out)
    try:
        resume = _agree(accelerator, lambda: _prepare_run(cfg, accelerator.is_main_process, lock))
        return _train(cfg, accelerator, resume)
    finally:
        lock.release()


def _train(cfg: TrainConfig, accelerator, resume: Checkpoint | None) -> TrainResult:
    from accelerate.utils import set_seed
    from timm.scheduler import CosineLRScheduler
    from tqdm.auto import tqdm

    main = accelerator.is_main_process
    out = Path(cfg.run.out)
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
    csv_path = out / "metrics.csv"
    if resume is not None:
        backbone = checkpoint_backbone(to_dict(cfg))
        fit_weights(raw, resume.model, resume.path, checkpoint_backbone(resume.config), backbone)
        state = resume.state
        optimizer.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        loader.chain.load_state_dict(state["stages"])
        torch.set_rng_state(state["rng"]["torch"])
        update = int(resume.update)
        if main:
            _keep_rows_until(csv_path, update)
        logger.info("resumed from %s at update %d", resume.path, update)
    scheduler.step_update(update)
    if main:
        accelerator.init_trackers("masklab", config=_flat(to_dict(cfg)))
        if not csv_path.exists() or resume is None:
            with open(csv_path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_FIELDS).writeheader()

    def training_state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "stages": loader.chain.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
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
                    last_path = save_checkpoint(
                        checkpoint_dir(cfg), update, raw.state_dict(), training_state(), to_dict(cfg), cfg.run.keep
                    )
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


def load_trained(checkpoint: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), trust: bool = False):
    """``(config, model)`` of a checkpoint (its config, then ``overrides``), weights loaded, in eval mode.

    Only the checkpoint's weights and config are read (``model.safetensors``), never unpickled
    unless ``trust`` and the checkpoint is an older single ``.pt`` file that needs it.
    ``checkpoint`` may be ``random``: the model of ``overrides``' config at random initialisation.

    Raises:
        FileNotFoundError: no such checkpoint.
        CheckpointError: not a checkpoint, refused (see :func:`~masklab.recipes.checkpoint.load_checkpoint`),
            no config recorded, or weights that do not fit the model the config builds.
    """
    from .checkpoint import trained_config
    from .config import load_config

    if str(checkpoint) == "random":
        trained = None
        cfg = load_config(None, list(overrides))
    else:
        trained = read_checkpoint(checkpoint, trust=trust, training_state=False)
        cfg = trained_config(trained, overrides)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    if trained is not None:
        source, requested = checkpoint_backbone(trained.config), checkpoint_backbone(to_dict(cfg))
        fit_weights(model, trained.model, trained.path, source, requested)
    return cfg, model.eval()


def evaluate_checkpoint(
    checkpoint: str | os.PathLike, kind: str = "knn", overrides: list[str] | tuple[str, ...] = (), trust: bool = False
) -> dict[str, float]:
    """kNN or linear-probe accuracy of a checkpoint's encoder (its config, then ``overrides``).

    ``checkpoint`` may also be ``random``: the encoder of ``overrides``'
    config at random initialisation (the baseline a trained one must beat).
    ``trust``: see :func:`load_trained`.
    """
    if kind not in ("knn", "linear"):
        raise ValueError(f"evaluation must be knn or linear, got {kind!r}")
    cfg, model = load_trained(checkpoint, overrides, trust)
    device = (
        torch.device("cpu")
        if cfg.run.device in ("auto", "cpu") and not torch.cuda.is_available()
        else torch.device("cuda" if cfg.run.device == "auto" else cfg.run.device)
    )
    model.to(device)
    return evaluate_encoder(cfg, encoder_of(model), device, family_of(model), (kind,))
