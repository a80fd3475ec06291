"""The training loop: any (loader stages, backbone, objective) on Accelerate.

:func:`train` is the outline of a run; the jobs around it have a module each:
:mod:`~masklab.recipes.accelerator` (the Accelerator and its device),
:mod:`~masklab.recipes.checkpoint` (saving and resuming),
:mod:`~masklab.recipes.metrics` (CSV, trackers, progress bar) and
:mod:`~masklab.recipes.trained` (evaluating a trained encoder or checkpoint,
re-exported here). The loop talks to stages and objectives only through the
abilities they declare (:mod:`masklab.transforms.protocols`,
:mod:`masklab.objectives.protocols`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from masklab.objectives.protocols import HasTeachers, OffersGuidance
from masklab.pipeline import clamp_progress, replace_atomically
from masklab.transforms.protocols import GuidedStage, ProgressAware, RefreshesCache

from .accelerator import agree, make_accelerator
from .build import (
    build_loader,
    build_model,
    build_optimizer,
    check_evaluation_labels,
    checkpoint_dir,
    encoder_of,
    family_of,
    peak_lr,
    sync_batchnorm,
)
from .checkpoint import Checkpoint, Checkpointer, check_resumable
from .config import TrainConfig, save_config, to_dict
from .metrics import RunLog, plot_losses
from .run_folder import RunFolderError, RunLock, check_resumed_config, find_resume, prepare_fresh_run
from .trained import evaluate_checkpoint, evaluate_encoder, evaluate_knn, load_trained

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "KnnMonitor",
    "TrainResult",
    "bind_guidance",
    "evaluate_checkpoint",
    "evaluate_encoder",
    "evaluate_knn",
    "load_trained",
    "make_accelerator",
    "plot_losses",
    "refresh_caches",
    "set_progress",
    "step_teachers",
    "train",
]

logger = logging.getLogger(__name__)


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


def bind_guidance(
    stages: Iterable[nn.Module],
    objective: nn.Module,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> int:
    """Hand each :class:`~masklab.transforms.protocols.GuidedStage` its guide: the objective's ``guidance(kind)``.

    Stages never import a model; the loop binds them. Returns how many stages were bound.

    Args:
        stages: the loader's stage chain.
        objective: the (unwrapped) objective.
        autocast: a context factory the guide runs under (the loop passes ``accelerator.autocast``, so the
            guide's forward pass runs at the training step's precision; the stage runs outside the model's
            wrapped ``forward``, where Accelerate's autocast does not reach). The guide's maps come back as
            float32 either way. ``None``: the guide as the objective gives it.

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
        guide = objective.guidance(stage.guide_kind)
        stage.bind(guide if autocast is None else _under(guide, autocast))
        bound += 1
    return bound


def _under(guide, autocast: Callable[[], contextlib.AbstractContextManager]):
    """``guide`` run inside ``autocast()``, its maps as float32."""

    def guide_under_autocast(images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        with autocast():
            return guide(images, grid).float()

    return guide_under_autocast


def refresh_caches(
    cfg: TrainConfig,
    stages: Iterable[nn.Module],
    objective: nn.Module,
    accelerator: Accelerator,
    family: str,
    epoch: int,
) -> int:
    """Refresh each :class:`~masklab.transforms.protocols.RefreshesCache` stage due at ``epoch``
    (AMT's saliency), each rank its shard, gathered. Returns how many stages were refreshed."""
    due = [s for s in stages if isinstance(s, RefreshesCache) and s.refresh_due(epoch, cfg.run.epochs)]
    if not due:
        return 0
    from masklab.transforms import patch_grid

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


def set_progress(stages: Iterable[nn.Module], progress: float) -> None:
    """Tell each :class:`~masklab.transforms.protocols.ProgressAware` stage where training is, in [0, 1]."""
    for stage in stages:
        if isinstance(stage, ProgressAware):
            stage.set_progress(clamp_progress(progress))


def step_teachers(objective: nn.Module, progress: float) -> int:
    """Step every EMA teacher of a :class:`~masklab.objectives.protocols.HasTeachers` objective after an update.

    Returns how many were stepped.
    """
    pairs = objective.teachers() if isinstance(objective, HasTeachers) else []
    for teacher, student in pairs:
        teacher.update(student, progress)
    return len(pairs)


def _prepare_run(cfg: TrainConfig, main: bool, lock: RunLock, processes: int = 1) -> Checkpoint | None:
    """Lock the run folder, read the checkpoint to resume and check it against ``cfg``, or clear the
    folder for a fresh run; write ``config.yaml`` only once all of that passed. Returns the checkpoint."""
    check_evaluation_labels(cfg)
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
        check_resumed_config(resume, cfg, processes)
        check_resumable(resume)
    if main:
        if resume is None:
            prepare_fresh_run(out, cfg.run.overwrite)
        replace_atomically(lambda tmp: save_config(cfg, tmp), out / "config.yaml")
    return resume


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
        resume = agree(
            accelerator, lambda: _prepare_run(cfg, accelerator.is_main_process, lock, accelerator.num_processes)
        )
        return _train(cfg, accelerator, resume)
    finally:
        lock.release()


def _schedule(cfg: TrainConfig, optimizer, batches_per_epoch: int, processes: int = 1):
    """``(scheduler, total)``: timm's cosine schedule with warm-up, stepped per update, and the run's updates."""
    from timm.scheduler import CosineLRScheduler

    updates_per_epoch = max(1, batches_per_epoch // cfg.optim.grad_accum)
    total = cfg.run.epochs * updates_per_epoch
    if cfg.run.max_steps is not None:
        total = min(total, cfg.run.max_steps)
    warmup = int(round(cfg.optim.warmup_epochs * updates_per_epoch))
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total),
        lr_min=cfg.optim.min_lr,
        warmup_t=min(warmup, max(0, total - 1)),
        warmup_lr_init=peak_lr(cfg, processes) * 0.01,
        t_in_epochs=False,
    )
    return scheduler, total


def _lr_source(cfg: TrainConfig, accelerator) -> str:
    o = cfg.optim
    if o.base_lr is None:
        return "optim.lr"
    batch = cfg.data.batch_size * o.grad_accum * accelerator.num_processes
    return f"optim.base_lr={o.base_lr:g} x global batch {batch} / 256"


def _finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    """Whether every process's ``loss`` is finite (a host sync: only with ``run.skip_nonfinite``)."""
    finite = torch.isfinite(loss.detach()).all().float().reshape(1)
    return bool(accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes)


def _step(cfg: TrainConfig, accelerator, model, optimizer, batch, bad: list[bool]):
    """Forward, backward and (on the last micro-batch of an update) the optimizer step; the objective's output.

    With ``run.skip_nonfinite`` each micro-batch's loss is checked on every process; an update any
    of whose losses was not finite anywhere is skipped whole (its gradients dropped), and
    ``bad[0]`` says so until the loop resets it.
    """
    with accelerator.accumulate(model):
        result = model(batch)
        if cfg.run.skip_nonfinite and not _finite_everywhere(accelerator, result.loss):
            bad[0] = True
        accelerator.backward(result.loss)
        if accelerator.sync_gradients and cfg.optim.clip_grad and not bad[0]:
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        if not (accelerator.sync_gradients and bad[0]):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return result


class KnnMonitor:
    """kNN accuracy of the encoder's frozen features, train split against test split, on every process.

    Each process encodes its shard of the evaluation loaders (built once, at the first pass) and the
    features are gathered, so no process waits while another evaluates alone; every process gets
    the same score. The first pass's cost is logged once.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, family: str) -> None:
        self.cfg, self.accelerator, self.family = cfg, accelerator, family
        self.loaders = None
        self.timed = False

    def __call__(self, encoder) -> float:
        distributed = self.accelerator.num_processes > 1
        if self.loaders is None:
            self.loaders = tuple(
                build_loader(self.cfg, split, self.accelerator.device, self.family, distributed, train=False)
                for split in ("eval", "test")
            )
        start = time.perf_counter()
        gather = self.accelerator.gather if distributed else None
        knn = evaluate_encoder(self.cfg, encoder, self.accelerator.device, self.family, ("knn",), self.loaders, gather)[
            "knn"
        ]
        if not self.timed:
            self.timed = True
            logger.info("one kNN monitor pass takes %.1f s", time.perf_counter() - start)
        return knn


def _train(cfg: TrainConfig, accelerator, resume: Checkpoint | None) -> TrainResult:
    from accelerate.utils import set_seed

    out = Path(cfg.run.out)
    set_seed(cfg.run.seed)
    model = sync_batchnorm(cfg, build_model(cfg), accelerator.device, accelerator.num_processes)
    family = family_of(model)
    loader = build_loader(cfg, "train", accelerator.device, family, distributed=accelerator.num_processes > 1)
    optimizer = build_optimizer(cfg, model, accelerator.num_processes)
    rate = f"peak lr {peak_lr(cfg, accelerator.num_processes):.4g} ({_lr_source(cfg, accelerator)})"
    if cfg.optim.base_lr is not None:  # a rate the user did not type: say what it came to
        accelerator.print(rate)
    logger.info(rate)
    scheduler, total = _schedule(cfg, optimizer, len(loader), accelerator.num_processes)
    stop_at = total if cfg.run.stop_at is None else min(total, cfg.run.stop_at)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.prepare_scheduler(scheduler)  # so save_state / load_state carry it; the loop steps it by update
    raw = accelerator.unwrap_model(model)
    checkpoints = Checkpointer(
        accelerator,
        checkpoint_dir(cfg),
        to_dict(cfg),
        cfg.run.keep,
        {"loader": loader, "stages": loader.chain},
        trust=cfg.run.trust_checkpoint,
    )
    update = 0
    if resume is not None:
        saved = resume.state.get("batches_per_epoch")
        if saved is not None and int(saved) != len(loader):
            raise RunFolderError(
                f"resuming {resume.path}: its epochs had {saved} batches per process, this run's have {len(loader)} "
                f"({accelerator.num_processes} process(es), data.batch_size={cfg.data.batch_size}); the schedule and "
                "the loader position would not carry over. Keep data.batch_size x processes as it was"
            )
        checkpoints.resume(resume)
        update = int(resume.update)
        logger.info("resumed from %s at update %d", resume.path, update)
    scheduler.step_update(update)
    log = RunLog(accelerator, out, to_dict(cfg), total, update, resume is not None, cfg.run.progress)

    recorded: list[torch.Tensor] = []
    bad, skips = [False], 0  # run.skip_nonfinite: this update saw a non-finite loss; updates skipped so far
    monitor, monitor_due = KnnMonitor(cfg, accelerator, family), False
    last_checkpoint = resume.path if resume is not None else None  # a run resumed at its end ends there
    bind_guidance(loader.chain, raw, accelerator.autocast)
    set_progress(loader.chain, update / total)
    model.train()
    while update < stop_at:
        epoch = loader.epoch
        if loader.step == 0:
            refresh_caches(cfg, loader.chain, raw, accelerator, family, epoch)
        for batch in loader:
            result = _step(cfg, accelerator, model, optimizer, batch, bad)
            every = cfg.eval.every_epochs
            if every and loader.step == len(loader) and (epoch + 1) % every == 0:
                monitor_due = True  # at this update, or the first one completed after it (accumulation)
            log.saw(len(batch))
            if cfg.run.record_indices:
                recorded.append(batch.index.cpu())
            if not accelerator.sync_gradients:
                continue
            update += 1
            skipped, bad[0] = bad[0], False
            if skipped:
                skips += 1
                logger.warning(
                    "skipped update %d: its loss was not finite (%d of run.skip_nonfinite=%d)",
                    update,
                    skips,
                    cfg.run.skip_nonfinite,
                )
                if skips > cfg.run.skip_nonfinite:
                    log.record(update, epoch, result.loss, optimizer.param_groups[0]["lr"], batch.mask)
                    log.flush()  # raises NonFiniteLoss, naming the update
            scheduler.step_update(update)
            step_teachers(raw, update / total)
            set_progress(loader.chain, update / total)
            log.record(update, epoch, result.loss, optimizer.param_groups[0]["lr"], batch.mask, skipped)
            if monitor_due:
                monitor_due = False
                model.eval()
                log.note(knn=monitor(encoder_of(raw)))
                model.train()
            checkpoint_due = update % cfg.run.ckpt_every == 0 or update >= stop_at
            if len(log.pending) >= cfg.run.log_every or checkpoint_due:
                log.flush()  # before a checkpoint: a resume keeps the rows up to it
            if checkpoint_due:
                last_checkpoint = checkpoints.save(update)
            if update >= stop_at:
                break
    log.close()

    trained = TrainResult(out, update, raw, log.losses, checkpoint=last_checkpoint, stages=loader.chain)
    if recorded:
        trained.indices = torch.cat(recorded)
    if cfg.eval.at_end and update >= total:
        model.eval()
        trained.knn = monitor(encoder_of(raw))  # every process evaluates its shard
        if accelerator.is_main_process:
            (out / "eval.json").write_text(json.dumps({"knn": trained.knn, "updates": update}, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return trained
