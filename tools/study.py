"""The study: every method against its baseline on the study's shapes, equal updates, several seeds.

Each *arm* is a recipe plus the overrides that put it on its family's
backbone: the masked-image-modelling arms (MAE, SimMIM, AMT, EHM, AttMask,
ColorMAE, multi-block, HPM) train a 4-block ViT-tiny at patch 4, the
siamese arms (MoCo v2, MixMask, BYOL, MaskDeep) and the supervised ones a
narrow ResNet-18 (widths 16-128, the small-image stem). Every arm sees the
same data (:data:`STUDY_DATA`) with the same batch size for the same number
of epochs, so the same number of optimizer updates (the equal-wall-clock AMT
arms excepted); then kNN and a linear probe on the frozen encoder, and for
the masked-image arms fine-tuning on a labelled tenth. A random-init row per
family says what the encoder gives before any training. :func:`run_curves`
draws the budget curves that chose :data:`STUDY_EPOCHS`.

Results go to ``results.json`` (every run, rewritten after each one, so a
stopped study resumes where it stopped; a run it was training goes on from its last checkpoint,
:data:`RESUME_EVERY`), ``results.md`` (the table) and
``results.png`` (the plot).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masklab.recipes.demo import MEAN_POOLED_VIT, RunScores

from .placement import PLACEMENT_IMAGES

__all__ = [
    "STUDY_ARMS",
    "Arm",
    "curve_placement_table",
    "plot_curves",
    "placement_table",
    "plot_study",
    "run_curves",
    "run_study",
    "study_markdown",
    "study_table",
    "write_report",
]

README_PLOT = "docs/study.png"
README_FIGURES = "docs/study.json"

# The ViT arms are read (kNN, linear probe, fine-tuning) through the mean of the patch tokens, as the demo is, and
# as MAE (main_finetune's global_pool) and SimMIM (USE_MEAN_POOLING) fine-tune: no MIM loss reads the class token.
# Our choice beyond the references: the pretrained final norm is kept, per token, before the mean (they pool first
# and train a fresh norm), and the linear probe reads the mean too (MAE's main_linprobe reads the class token).
VIT = (MEAN_POOLED_VIT,)
CNN = ("model.kwargs={channels: [16, 32, 64, 128], stem_width: 16}",)
SUPERVISED = (*CNN, "model.small_stem=true", "objective.erase_ratio=0.0")


@dataclass(frozen=True)
class Arm:
    """One row of the study: ``recipe`` with ``overrides``, compared with the arm named ``baseline``."""

    name: str
    recipe: str
    baseline: str | None = None
    overrides: tuple[str, ...] = ()
    family: str = "vit"  # vit | cnn: which random-init row it is read against
    claim: str = ""  # what the method's paper reports against the baseline, at the paper's scale
    equal_time: str | None = None  # an arm run for the updates it buys in its baseline's time (see run_study)
    control: str | None = None  # another arm it is also read against (AMT: its ratios on random cells)

    @property
    def self_supervised(self) -> bool:
        """Every arm but the supervised ones: those the bar (:data:`BAR`) holds to."""
        return not self.recipe.startswith("supervised")

    @property
    def finetune(self) -> bool:
        """Masked-image arms are also fine-tuned on a labelled tenth, where MAE-style methods show their gains."""
        return self.family == "vit"


STUDY_ARMS: tuple[Arm, ...] = (
    Arm("mae", "mae", None, VIT, "vit"),
    Arm(
        "mae_amt",
        "mae_amt",
        "mae",
        VIT,
        "vit",
        "+2.9 to +5.9 points of MAE's linear-probe accuracy on CIFAR-10/100, STL-10, Tiny ImageNet and ImageNet-1K",
        control="mae_random_throw",
    ),
    Arm(
        "mae_random_throw",
        "mae",
        "mae",
        (*VIT, "mask.ratio=0.45", "mask.throw_ratio=0.4"),
        "vit",
        "our control for AMT: MAE-AMT's ratios (0.45 masked, 0.40 thrown) on random cells, no attention; "
        "mae_amt is read against it too",
    ),
    Arm(
        "mae_amt_late",
        "mae_amt",
        "mae",
        (*VIT, "mask.refresh_start=0.67"),
        "vit",
        "our diagnostic, not the paper's schedule: MAE-AMT with its first refresh at two thirds of the run, after "
        "MAE's attention has found the object (the curve placements); read against MAE and AMT's control",
        control="mae_random_throw",
    ),
    Arm("simmim", "simmim", None, VIT, "vit"),
    Arm(
        "simmim_amt",
        "simmim_amt",
        "simmim",
        VIT,
        "vit",
        "better fine-tuning accuracy than SimMIM",
        control="simmim_random_throw",
    ),
    Arm(
        "simmim_random_throw",
        "simmim",
        "simmim",
        (*VIT, "mask.ratio=0.44", "mask.throw_ratio=0.26"),
        "vit",
        "our control for SimMIM-AMT: its ratios (0.44 masked, 0.26 thrown, counts rounded up, on SimMIM's "
        "cells) on random cells, no attention; simmim_amt is read against it too",
    ),
    Arm(
        "simmim_amt_late",
        "simmim_amt",
        "simmim",
        (*VIT, "mask.refresh_start=0.67"),
        "vit",
        "our diagnostic, not the paper's schedule: SimMIM-AMT with its first refresh at two thirds of the run, "
        "as mae_amt_late; read against SimMIM and AMT's control",
        control="simmim_random_throw",
    ),
    Arm(
        "mae_amt_equal_time",
        "mae_amt",
        "mae",
        VIT,
        "vit",
        "throwing drops cells from encoder, decoder and loss, so a step costs less (METHODS.md); here "
        "mae_amt gets the updates its steps buy in mae's training time. Our choice: AMT's refresh passes stay out "
        "of that budget; at this study's length they take about what throwing saves, so mae_amt's own row is the "
        "equal-wall-clock reading with them, and this row the one where they are amortised, as over the paper's "
        "400 epochs (the throwing benchmark)",
        equal_time="mae_amt",
    ),
    Arm(
        "simmim_amt_equal_time",
        "simmim_amt",
        "simmim",
        VIT,
        "vit",
        "as above, for SimMIM: simmim_amt gets the updates its steps buy in simmim's training time, its "
        "refresh passes left out",
        equal_time="simmim_amt",
    ),
    Arm(
        "ehm",
        "ehm",
        "mae",
        VIT,
        "vit",
        "+1.1 points on ImageNet-1K classification and +1.4 on ADE20K segmentation at equal epochs",
    ),
    Arm(
        "mae_colormae",
        "mae_colormae",
        "mae",
        VIT,
        "vit",
        "green-noise masks: +2.72 mIoU on ADE20K over MAE's random masks (ViT-B/16)",
    ),
    Arm(
        "mae_attmask",
        "mae_attmask",
        "mae",
        VIT,
        "vit",
        "AttMask-Hint on iBOT: better kNN, linear-probe and fine-tuning accuracy than random masks (ViT-S/16)",
    ),
    Arm(
        "mae_multiblock", "mae_multiblock", "mae", VIT, "vit", "none for MAE (I-JEPA's blocks serve its own objective)"
    ),
    Arm("mae_hpm", "mae_hpm", "mae", VIT, "vit", "better ImageNet-1K fine-tuning than MAE at equal epochs (ViT-B/16)"),
    Arm("moco", "moco", None, CNN, "cnn"),
    Arm(
        "mixmask_moco",
        "mixmask_moco",
        "moco",
        CNN,
        "cnn",
        "69.2 against 67.7 ImageNet linear top-1 (ResNet-50, 200 epochs)",
    ),
    Arm("byol", "byol", None, CNN, "cnn"),
    Arm(
        "maskdeep",
        "maskdeep",
        "byol",
        CNN,
        "cnn",
        "71.2 ImageNet linear top-1 at 200 epochs, 69.6 at 100 (ResNet-50)",
    ),
    Arm("supervised", "supervised", None, (*SUPERVISED, "objective.mixmask=false"), "cnn"),
    Arm(
        "supervised_mixmask",
        "supervised",
        "supervised",
        (*SUPERVISED, "objective.mixmask=true"),
        "cnn",
        "a CutMix-like regulariser (no figure in METHODS.md)",
    ),
)
"""The study: MAE, MAE+AMT, SimMIM, SimMIM+AMT (each AMT arm also at equal wall-clock time), EHM, MAE with
AttMask's attended cells, ColorMAE's green-noise masks, I-JEPA's multi-block masks and HPM's hard patches, MAE with
AMT's ratios on random cells (the control that separates AMT's attention from its ratios), MoCo v2,
MixMask-MoCo, BYOL, MaskDeep, supervised with and without MixMask. Supervised arms turn patch erasing off so
MixMask is the only difference."""

STUDY_DATA = {"length": 8000, "size": 32, "background": "grey"}
"""The study's data: built-in shapes, grey on plain grey backgrounds, 8000 training and 2000 test images at 32 px.

Chosen by measurement (issue 20). On the textured, coloured shapes the siamese baselines stayed within a few
points of their random-init encoder (MoCo after 930 updates: kNN 0.192 against 0.146), and the supervised
ResNet reached 0.91 there, so the data was learnable but not by instance discrimination: each image's colours
(shape and background, six continuous values that colour jitter only blurs) tell it apart from the others,
so the siamese objectives could be solved without the shape. Plain coloured backgrounds did not change that
(MoCo after 620 updates: kNN 0.191 against 0.171 at random init); grey shapes on grey backgrounds did (after 310
updates: kNN 0.351 against 0.228, linear 0.367 against 0.267). What varies is then the shape (the class), its
grey level and the background's, its size, rotation and position. The same data serves every arm."""

STUDY_BATCH = 128
"""The study's batch: the recipes' default ``data.batch_size`` (``DataConfig``), which every CPU arm keeps."""

STUDY_EPOCHS = 15
"""15 epochs of 8000 images at batch 128: 930 updates an arm. From the budget curves (``docs/study_curves.png``):
MAE, SimMIM, MoCo and BYOL (with LARS at a base rate of 1.0, ``byol.yaml``) are past their random init by more
than :data:`BAR` there."""

FINETUNE = {"fraction": 0.1, "epochs": 30, "batch_size": 64}
"""Fine-tuning of the masked-image arms' encoders (and the random-init ViT): ``finetune`` recipe on the first 10%
of the training images (balanced: labels cycle), 30 epochs at batch 64, the same for every arm; top-1 on the
test split."""

RESUME_EVERY = 150
"""Updates between a study run's checkpoints: a run stopped between sittings resumes from its last one, so a
stopped study loses at most this many updates of each run it was training. The resumed run continues the same
run (the checkpoint holds the optimizer, the loader's position, the stages' caches and the RNG; tested equal to an
uninterrupted run to 1e-6). Only ``run`` keys change: not part of an arm's fingerprint or of the study's
settings."""

QUICK = {"length": 512, "epochs": 1, "linear_epochs": 20, "seeds": (0,), "finetune_epochs": 1, "finetune_batch": 16}
"""``--quick``: 512 images, one epoch (4 updates), one seed; the whole study in a few minutes."""

CURVE_ARMS = ("mae", "simmim", "moco", "byol")
CURVE_EPOCHS = 20
CURVE_EVERY = 5
"""Budget curves: each baseline trained once for ``CURVE_EPOCHS`` epochs of the study's data, its
checkpoint every ``CURVE_EVERY`` epochs evaluated (kNN, linear probe), with its random init at 0 updates."""

CURVE_MASKS = {"mae": ("mae_amt", "mae_attmask")}
"""The informed masks that read a model's attention, drawn from the budget curves' MAE checkpoints: where AMT's
and AttMask's masks would land at each point of MAE's training (:func:`~masklab.tools.placement.mask_placement`
with ``mask_of``), recorded as each point's ``placement``."""

BASELINE_MASKS = {"mae": ("mae_amt",), "simmim": ("simmim_amt",)}
"""The attention-guided masks drawn from each baseline's own trained checkpoints (every seed), recorded as the
run's ``placement_of``: where the AMT variant's masks would land if guided by its baseline's trained encoder,
apart from what training under those masks did to the encoder."""

README_CURVES = "docs/study_curves.png"
README_CURVE_FIGURES = "docs/study_curves.json"


def _arm_for(name: str) -> Arm:
    known = {arm.name: arm for arm in STUDY_ARMS}
    if name in known:
        return known[name]
    from masklab.recipes.config import _resolve

    _resolve(name)  # a recipe name or YAML file, else FileNotFoundError naming what exists
    return Arm(name, name)


GPU_PRESET = {"length": 50000, "epochs": 6, "seeds": (0,), "batch_size": 256, "num_workers": 12}
"""``--preset gpu``: the study's shapes as a 50000-image built-in source, generated once into memory by 12
processes (at most one per CPU) on the machine's CPUs and gathered on the device per batch
(``data.in_memory``, ``DatasetLoader``: no ``.beton`` to write, no FFCV needed), batch 256, 6 epochs (1170
updates an arm), bf16 where the device has it (``optim.mixed_precision=auto``), one seed; fine-tuning on the
first 5000 training images, tested on the first 1250 test images. The first run on an H100 (2026-11-27)
generated the images per epoch in 12 loader workers and spent 84 s on the random CNN row alone (two evaluation
passes, no training); hence the one generation into memory. On an H200 with it (``docs/gpu-h200-2026-11-27.md``,
class-token pooling then) the random CNN row took 42 s (the generation included), the random ViT 90 s and MAE
89 s (1170 updates, evaluation and fine-tuning): the whole preset, one seed of every arm, is some 40 minutes
there, longer than a device lease, so ``make gpu-check`` runs MAE and MAE-AMT alone
(``masklab.tools.gpu_check.GPU_STUDY_ARMS``). At that scale MAE's kNN and linear probe were double random
init's, one seed."""

PRESETS = ("cpu", "gpu")


def _study_data(out: Path, quick: bool, preset: str = "cpu") -> tuple[dict[str, str], str, list[str], list[str]]:
    """``(data, subset, common, subset_common)``: the train and test sources, the labelled fraction used for
    fine-tuning, and the overrides every run and every fine-tuning run need to read them (written once)."""
    from masklab.pipeline import Shapes, write_dataset
    from masklab.recipes.demo import write_shapes

    size, background = STUDY_DATA["size"], STUDY_DATA["background"]
    if preset == "gpu":
        name = f"builtin:shapes-{background}"
        length = QUICK["length"] if quick else GPU_PRESET["length"]
        count = round(length * FINETUNE["fraction"])
        workers = min(GPU_PRESET["num_workers"], os.cpu_count() or 1)
        common = [f"data.resolution={size}", f"data.batch_size={GPU_PRESET['batch_size']}"]
        # Generated once into memory by the workers, then gathered on the device: no per-epoch generation.
        common += [f"data.num_workers={workers}", "data.in_memory=true"]
        # Shapes draws image i the same for any length: data.length=count reads the first count images.
        tune = [f"data.resolution={size}", f"data.num_workers={workers}", f"data.length={count}", "data.in_memory=true"]
        return {"train": name, "test": f"{name}:test"}, name, [*common, f"data.length={length}"], tune
    length = QUICK["length"] if quick else STUDY_DATA["length"]
    data = write_shapes(out / "data", length=length, size=size, background=background)
    count = max(8, round(length * FINETUNE["fraction"]))
    subset = data["train"].with_name(data["train"].stem + f"-first{count}.beton")
    if not subset.exists():  # the first images of the training split: Shapes draws image i the same for any length
        source = Shapes(size=size, length=count, seed=0, split="train", background=background)
        write_dataset(source, subset, progress=False)
    return {split: str(path) for split, path in data.items()}, str(subset), [], []


def _common(data: dict[str, str], epochs: int, quick: bool, overrides: Sequence[str]) -> list[str]:
    return [
        f"data.train={data['train']}",
        f"data.test={data['test']}",
        f"run.epochs={epochs}",
        "run.progress=false",
        "run.ckpt_every=100000",
        "run.keep=1",
        "eval.at_end=false",
        *([f"eval.linear_epochs={QUICK['linear_epochs']}"] if quick else []),
        *overrides,
    ]


def run_study(
    arms: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    out: Path = Path("runs/study"),
    overrides: Sequence[str] = (),
    epochs: int | None = None,
    quick: bool = False,
    log: Callable[[str], object] = print,
    preset: str = "cpu",
    jobs_at_once: int = 1,
    start_from: Path | None = None,
) -> RunScores:
    """Train every arm with every seed on the study's shapes, evaluate kNN and a linear probe (and fine-tuning).

    Args:
        arms: names from :data:`STUDY_ARMS`, or other recipe names / YAML files
            (run as they are); ``None`` runs all of :data:`STUDY_ARMS`.
        seeds: one run per arm and seed.
        out: the study's folder: data, one run folder per arm and seed, results.
        overrides: dotted overrides applied to every run, after the arm's own.
        epochs: epochs per run (the same for every arm, so the same updates; default :data:`STUDY_EPOCHS`).
        quick: :data:`QUICK`'s smaller data, one epoch, one seed (a smoke run).
        preset: ``cpu`` (:data:`STUDY_DATA`, :data:`STUDY_EPOCHS`) or ``gpu`` (:data:`GPU_PRESET`, which sets
            the seeds and the default epochs).
        jobs_at_once: runs trained at once, each in its own process with its share of the CPU cores
            (:func:`_pool`); 1 (the default) trains them one after another in this process. On a small CPU
            machine two small runs side by side use the cores better than one run with every core.
        start_from: a saved study (``results.json``, or :data:`README_FIGURES` on a fresh clone) whose runs
            ``out`` starts from when it holds no ``results.json`` yet: its runs recorded as they are now are
            kept, the rest trained. Its settings must be this study's (:class:`ValueError` otherwise). The runs
            it brings have no checkpoints in ``out``; they carry all that the report reads.

    Each run records its scores, its updates, its training time and images per second. Masked-image arms
    (and the random-init ViT) are also fine-tuned on a labelled tenth (:data:`FINETUNE`). An arm with
    ``equal_time`` gets the updates its own steps buy in its baseline's training time (same seed), so it
    runs after both.

    Runs already in ``out/results.json`` with the same settings are kept, not
    rerun. Returns every run's scores; writes ``results.md`` and ``results.png``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    chosen = [_arm_for(name) for name in (arms or [a.name for a in STUDY_ARMS])]
    if preset == "gpu":
        epochs, seeds = epochs or GPU_PRESET["epochs"], GPU_PRESET["seeds"]
    epochs = STUDY_EPOCHS if epochs is None else epochs
    if quick:
        epochs, seeds = QUICK["epochs"], QUICK["seeds"]
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if not seeds:
        raise ValueError("give at least one seed")
    if jobs_at_once < 1:
        raise ValueError(f"jobs_at_once must be at least 1, got {jobs_at_once}")
    known = {arm.name for arm in chosen}
    for arm in chosen:
        if arm.equal_time and not {arm.baseline, arm.equal_time} <= known:
            raise ValueError(f"arm {arm.name!r} needs arms {arm.baseline!r} and {arm.equal_time!r} in the same study")
    out.mkdir(parents=True, exist_ok=True)
    data, subset, data_common, subset_common = _study_data(out, quick, preset)
    common = _common(data, epochs, quick, [*data_common, *overrides])
    finetune_epochs = QUICK["finetune_epochs"] if quick else FINETUNE["epochs"]
    length = QUICK["length"] if quick else GPU_PRESET["length"] if preset == "gpu" else STUDY_DATA["length"]
    if quick and preset == "gpu":
        common.append(f"data.batch_size={GPU_PRESET['batch_size'] // 2}")  # 512 images make two batches
    settings = {"epochs": epochs, "length": length, "common": common, "finetune_epochs": finetune_epochs}
    settings["preset"] = preset
    settings["data"] = {**STUDY_DATA, "length": length}
    path = out / "results.json"
    _start_from(path, start_from, settings)
    result = RunScores.load_or_new(path, settings)
    families = {arm.family for arm in chosen}
    _LOADERS.clear()  # this study's data: built again
    ordered = [arm for arm in chosen if not arm.equal_time] + [arm for arm in chosen if arm.equal_time]
    jobs = [(f"random_{family}", None, family) for family in sorted(families)] + [
        (arm.name, arm, arm.family) for arm in ordered
    ]
    tune = (finetune_epochs, QUICK["finetune_batch"] if quick else FINETUNE["batch_size"])
    shared = (data, subset, tune, [*subset_common, *overrides], jobs_at_once)

    def todo(phase):  # the runs of ``phase`` not yet recorded as they are now, each with its extra overrides
        for name, arm, family in phase:
            for seed in seeds:
                done = result.runs.get(name, {}).get(str(seed))
                config = None if arm is None else arm_fingerprint(arm, common)
                kept = done is not None and done.get("overrides") == list(arm.overrides if arm else ())
                run_out = out / f"{name}-seed{seed}"
                if kept and arm is not None and done.get("config") != config and recorded_as_now(run_out, arm, common):
                    done["config"] = config  # recorded before a setting masklab gained since, at its default
                    result.save(path)
                if kept and done.get("config") == config:
                    if arm is not None and not _placed(done, arm):  # recorded before placements were
                        done.update(_placements(arm, _last_checkpoint(run_out)))
                        result.save(path)
                    continue
                extra: list[str] = []
                if arm is not None and arm.equal_time:
                    updates = equal_time_updates(result, arm, seed)
                    per = result.runs[arm.baseline][str(seed)]["updates"]
                    extra = [f"run.max_steps={updates}", f"run.epochs={math.ceil(updates / per * epochs)}"]
                yield (name, seed, config), (arm, family, seed, [*common, *extra], run_out, shared)

    def record(key, scores):
        name, seed, config = key
        if config is not None:
            scores["config"] = config
        result.runs.setdefault(name, {})[str(seed)] = scores
        result.save(path)
        tuned = f", fine-tuned {scores['finetune']:.3f}" if "finetune" in scores else ""
        log(
            f"{name} seed {seed}: kNN {scores['knn']:.3f}, linear {scores['linear']:.3f}{tuned}, "
            f"{scores['updates']} updates, {scores['seconds']:.0f} s"
        )

    # The equal-time arms read their pairs' recorded speeds: they run after every other run is in.
    phases = [
        [job for job in jobs if not (job[1] and job[1].equal_time)],
        [job for job in jobs if job[1] and job[1].equal_time],
    ]
    if jobs_at_once == 1:
        for phase in phases:
            for key, job in todo(phase):
                record(key, _study_job(*job))
    else:
        with _pool(jobs_at_once) as pool:
            for phase in phases:
                futures = {pool.submit(_study_job, *job): key for key, job in todo(phase)}
                for future in as_completed(futures):
                    record(futures[future], future.result())
    write_report(result, out, chosen)
    return result


_LOADERS: dict = {}
"""The evaluation loaders of this process, built once per data and device (:func:`_evaluate`)."""


def _study_job(
    arm: Arm | None, family: str, seed: int, common: list[str], run_out: Path, shared: tuple
) -> dict[str, Any]:
    """One run of the study: train (or build the random-init encoder), evaluate, fine-tune (masked-image arms
    and the random-init ViT), and measure where its masks land; its scores. ``shared`` is ``(data, subset,
    (fine-tuning epochs, batch size), fine-tuning overrides, runs at once)``, the last recorded as ``at_once``
    (its speed was shared with that many runs). Runs in the study's process or a worker's."""
    data, subset, tune, tune_overrides, at_once = shared
    start = time.perf_counter()
    scores = _run_one(arm, family, seed, common, run_out, _LOADERS)
    if family == "vit" and (arm is None or arm.finetune):
        scores["finetune"] = _finetune(arm, seed, data, subset, tune, tune_overrides, run_out, scores)
    if arm is not None:
        scores.update(_placements(arm, scores.get("checkpoint")))
    scores.pop("checkpoint", None)
    scores["seconds"] = time.perf_counter() - start + scores.get("resumed", {}).get("seconds", 0.0)
    scores["overrides"] = list(arm.overrides if arm else ())
    scores["at_once"] = at_once
    return scores


def _pool(workers: int):
    """``workers`` fresh (spawned) processes, each with ``cores // workers`` threads (at least one), each ending
    itself when the study's process is gone (a stopped study leaves no run going on)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_worker_start, initargs=(threads, os.getpid())
    )


def _worker_start(threads: int, parent: int) -> None:
    import threading

    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def write_report(result: RunScores, out: Path, arms: Sequence[Arm] = STUDY_ARMS) -> None:
    """``results.md`` (the table) and ``results.png`` (the plot) in ``out`` for the runs of ``arms`` in ``result``."""
    from masklab.pipeline import SHAPE_CLASSES, write_text_atomically

    write_text_atomically(out / "results.md", study_table(result, arms))
    plot_study(result, arms, out / "results.png", chance=1 / len(SHAPE_CLASSES))


def _last_checkpoint(run_out: Path) -> Path | None:
    from masklab.recipes.checkpoint import list_checkpoints

    found = list_checkpoints(run_out / "checkpoints")
    return found[-1] if found else None


def _placements(arm: Arm, checkpoint: str | os.PathLike | None) -> dict[str, Any]:
    """Where the run's own masks land on held-out shapes (:func:`~masklab.tools.placement.mask_placement`),
    as ``placement`` (``None`` without a checkpoint or a patch mask), and for a baseline of
    :data:`BASELINE_MASKS` where those masks would land guided by its checkpoint, as ``placement_of``."""
    if checkpoint is None:
        return {"placement": None}
    from .placement import mask_placement

    out: dict[str, Any] = {"placement": mask_placement(checkpoint, background=STUDY_DATA["background"])}
    if arm.name in BASELINE_MASKS:
        out["placement_of"] = _drawn_from(checkpoint, BASELINE_MASKS[arm.name])
    return out


def _drawn_from(checkpoint: str | os.PathLike, masks: Sequence[str]) -> dict[str, dict[str, float] | None]:
    """Per recipe in ``masks``, where its mask lands guided by ``checkpoint``'s model (``mask_of``)."""
    from .placement import mask_placement

    return {mask: mask_placement(checkpoint, background=STUDY_DATA["background"], mask_of=mask) for mask in masks}


def _placed(done: dict[str, Any], arm: Arm) -> bool:
    """Whether a recorded run has every placement :func:`_placements` records for ``arm``."""
    return "placement" in done and (arm.name not in BASELINE_MASKS or "placement_of" in done)


def arm_fingerprint(arm: Arm, common: Sequence[str]) -> str:
    """A short hash of the arm's whole resolved config (its recipe file as it is now, its overrides, the
    study's), ``run`` section aside: a recorded run whose recipe has changed since is trained again, not kept.

    Examples:
        >>> a = arm_fingerprint(Arm("mae", "mae"), ["run.epochs=2"])
        >>> a == arm_fingerprint(Arm("mae", "mae"), ["run.epochs=2", "run.seed=5"]), len(a)
        (True, 16)
        >>> a == arm_fingerprint(Arm("mae", "mae"), ["run.epochs=2", "optim.lr=0.1"])
        False
    """
    import dataclasses
    import hashlib
    import json

    from masklab.recipes.config import load_config

    cfg = dataclasses.asdict(load_config(arm.recipe, [*arm.overrides, *common]))
    cfg.pop("run")
    cfg["data"].pop("in_memory")  # how the images are held, not which: the same batches either way
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded_as_now(run_out: Path, arm: Arm, common: Sequence[str]) -> bool:
    """Whether the run in ``run_out`` was trained under the arm's config as it is now, read from the run's own
    ``config.yaml``: the ``run`` section and ``data.in_memory`` aside (as :func:`arm_fingerprint`), and a setting
    the recorded config lacks counting as its default (a setting masklab gained after the run, at its default,
    trains the same run; its fingerprint changed, the run did not).

    Examples:
        >>> import tempfile
        >>> from masklab.recipes.config import load_config, to_dict
        >>> from omegaconf import OmegaConf
        >>> folder = Path(tempfile.mkdtemp())
        >>> old = to_dict(load_config("simmim", ["run.seed=3"]))
        >>> del old["mask"]["throw_ratio"]  # written before the option existed
        >>> _ = (folder / "config.yaml").write_text(OmegaConf.to_yaml(old))
        >>> recorded_as_now(folder, Arm("simmim", "simmim"), []), recorded_as_now(folder, Arm("simmim", "simmim"), ["mask.ratio=0.5"])
        (True, False)
    """
    from omegaconf import OmegaConf

    from masklab.recipes.config import load_config, to_dict
    from masklab.recipes.run_folder import config_changes, config_defaults

    recorded = run_out / "config.yaml"
    if not recorded.is_file():
        return False
    cfg = load_config(arm.recipe, [*arm.overrides, *common])
    old = OmegaConf.to_container(OmegaConf.load(recorded))
    return not config_changes(old, to_dict(cfg), config_defaults(cfg), may_change=("run.", "data.in_memory"))


def equal_time_updates(result: RunScores, arm: Arm, seed: int) -> int:
    """The updates ``arm`` gets in its baseline's training time, at least one.

    The baseline's updates times the ratio of the two runs' steady speeds (``step_images_per_s``, from
    :func:`steady_images_per_s`: a median, so the first window, which pays the loader's compilation, and
    a stretch in which the machine was busy with other work do not move it; the study runs over several
    sittings on a shared machine). Runs recorded without it fall back to whole training times: the
    baseline's training seconds over the equal-updates arm's (``arm.equal_time``, same seed) seconds per
    update.

    The steady speed leaves AMT's refresh passes out (the logged windows that hold one are slow, and the
    median passes them by), as the study issue asks (the updates AMT's faster *steps* buy). Our choice, and
    it matters at the study's length: there the refreshes take about what throwing saves, so the
    equal-updates row (``arm.equal_time``) is also the equal-wall-clock reading with them, and this arm
    reads what the cheaper steps buy where the refreshes are amortised, as over the paper's 400 epochs.

    Examples:
        >>> r = RunScores(runs={"mae": {"0": {"step_images_per_s": 400.0, "updates": 50}},
        ...                     "mae_amt": {"0": {"step_images_per_s": 500.0, "updates": 50}}})
        >>> equal_time_updates(r, Arm("mae_amt_time", "mae_amt", "mae", equal_time="mae_amt"), 0)
        62
    """
    base, own = result.runs[arm.baseline][str(seed)], result.runs[arm.equal_time][str(seed)]
    if "step_images_per_s" in base and "step_images_per_s" in own:
        return max(1, math.floor(base["updates"] * own["step_images_per_s"] / base["step_images_per_s"]))
    return max(1, math.floor(base["train_seconds"] / (own["train_seconds"] / own["updates"])))


def steady_images_per_s(metrics_csv: Path) -> float | None:
    """The median over a run's updates of its logged training speed (``metrics.csv``'s ``images_per_s``: each
    update carries the speed of its logged window), or ``None`` when it logged none.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = path.write_text("update,images_per_s\\n1,10\\n2,10\\n3,90\\n4,90\\n5,100\\n6,100\\n")
        >>> steady_images_per_s(path)
        90.0
    """
    rates = _logged_rates(metrics_csv)
    return statistics.median(rates) if rates else None


def _logged_rates(metrics_csv: Path, until: int | None = None) -> list[float]:
    """Each logged update's ``images_per_s`` in a run's ``metrics.csv`` (up to update ``until``)."""
    if not metrics_csv.exists():
        return []
    with open(metrics_csv, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("images_per_s")]
    return [float(row["images_per_s"]) for row in rows if until is None or int(row["update"]) <= until]


def logged_seconds(metrics_csv: Path, until: int, images_per_update: int) -> float:
    """The training time a run's ``metrics.csv`` accounts for up to update ``until``: each row's images over
    its window's speed (``images_per_s`` is a logged window's images over its wall time, so the rows of a
    window add up to that window's time).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = path.write_text("update,images_per_s\\n1,64\\n2,64\\n3,32\\n4,32\\n")
        >>> logged_seconds(path, 3, 64)  # 1 s + 1 s + 2 s
        4.0
    """
    return sum(images_per_update / rate for rate in _logged_rates(metrics_csv, until) if rate > 0)


def _earlier_sitting(arm: Arm, overrides: list[str]):
    """``(config, update, seconds)`` to resume a run an earlier sitting stopped: its newest checkpoint that
    loads and was written under the same config (:func:`~masklab.recipes.run_folder.check_resumed_config`),
    the update it holds and the training seconds its ``metrics.csv`` logged until then; ``None`` to train
    afresh."""
    from masklab.recipes.checkpoint import CheckpointError
    from masklab.recipes.config import load_config
    from masklab.recipes.run_folder import RunFolderError, check_resumed_config, find_resume

    cfg = load_config(arm.recipe, [*overrides, "run.resume=auto"])
    try:
        found = find_resume(cfg, announce=False)
        if found is None:
            return None
        check_resumed_config(found, cfg)
    except (CheckpointError, RunFolderError):
        return None
    cfg = load_config(arm.recipe, [*overrides, f"run.resume={found.path}"])
    update = int(found.update or 0)
    return cfg, update, logged_seconds(Path(cfg.run.out) / "metrics.csv", update, cfg.data.batch_size)


def _train_resumable(arm: Arm, overrides: list[str], log: Callable[[str], object] | None = None):
    """Train ``arm`` under ``overrides``, going on from the checkpoint an earlier sitting left
    (:func:`_earlier_sitting`) or from the start (overwriting the run folder) when it left none that loads.

    Returns ``(config, trained, seconds, resumed)``: ``seconds`` counts the earlier sitting's logged training
    time, and ``resumed`` is ``{"update", "seconds"}`` where the run went on from a checkpoint, else ``None``.
    ``log``, where given, is told before training which checkpoint the run goes on from.
    """
    from masklab.recipes.config import load_config
    from masklab.recipes.train import train

    earlier = _earlier_sitting(arm, overrides)
    cfg, update, before = earlier or (load_config(arm.recipe, [*overrides, "run.overwrite=true"]), 0, 0.0)
    if update and log is not None:
        log(f"{arm.name}: going on from the checkpoint at update {update} an earlier sitting left")
    start = time.perf_counter()
    trained = train(cfg)
    seconds = time.perf_counter() - start + before
    return cfg, trained, seconds, ({"update": update, "seconds": before} if update else None)


def _run_one(
    arm: Arm | None, family: str, seed: int, common: list[str], run_out: Path, loaders: dict
) -> dict[str, Any]:
    """Train one arm (or, for ``arm=None``, build the family's random-init encoder) and evaluate it."""
    import torch

    from masklab.recipes.build import build_model
    from masklab.recipes.config import load_config

    checkpoint, resumed = None, None
    if arm is None:  # the family's encoder at random initialisation, on a reference recipe's model
        recipe, extra = ("mae", VIT) if family == "vit" else ("byol", CNN)
        cfg = load_config(recipe, [*extra, *common, f"run.seed={seed}", f"run.out={run_out}"])
        torch.manual_seed(seed)
        model, updates, seconds = build_model(cfg).eval(), 0, 0.0
    else:
        # A run that did not finish (its scores are not in results.json) goes on from its last checkpoint
        # (RESUME_EVERY), or from the start when it left none that loads under this config.
        own = [*arm.overrides, *common, f"run.seed={seed}", f"run.out={run_out}", f"run.ckpt_every={RESUME_EVERY}"]
        cfg, trained, seconds, resumed = _train_resumable(arm, own)
        model, updates, checkpoint = trained.model.eval(), trained.updates, trained.checkpoint
    scores = _evaluate(cfg, model, loaders)
    scores.update(updates=updates, train_seconds=seconds, checkpoint=checkpoint)
    if resumed:
        scores["resumed"] = resumed  # an earlier sitting trained this far
    if seconds:
        scores["images_per_s"] = updates * cfg.data.batch_size / seconds
        steady = steady_images_per_s(Path(cfg.run.out) / "metrics.csv")
        if steady is not None:
            scores["step_images_per_s"] = steady
    return scores


def _evaluate(cfg, model, loaders: dict) -> dict[str, float]:
    """kNN and linear probe of ``model``'s encoder; the evaluation loaders are built once per data and device."""
    from masklab.recipes.build import build_loader, encoder_of, family_of
    from masklab.recipes.train import evaluate_encoder

    device = next(model.parameters()).device
    key = (str(device), cfg.data.train, cfg.data.test, cfg.data.resolution, cfg.data.batch_size)
    key += (tuple(cfg.data.mean), tuple(cfg.data.std))
    if key not in loaders:  # every arm evaluates on the same whole, centred images: compile them once
        loaders[key] = tuple(build_loader(cfg, split, device, train=False) for split in ("train", "test"))
    return evaluate_encoder(cfg, encoder_of(model), device, family_of(model), ("knn", "linear"), loaders[key])


def _finetune(
    arm: Arm | None,
    seed: int,
    data: dict[str, str],
    subset: str,
    tune: tuple[int, int],
    overrides: Sequence[str],
    run_out: Path,
    scores: dict[str, Any],
) -> float:
    """Fine-tune the run's encoder (``None`` checkpoint: random init) on ``subset`` for ``tune = (epochs,
    batch size)``; top-1 on the test split."""
    from masklab.recipes.build import build_loader
    from masklab.recipes.config import load_config
    from masklab.recipes.evaluate import extract_features
    from masklab.recipes.train import train

    init = scores.get("checkpoint")
    if arm is not None and init is None:
        raise RuntimeError(f"run {run_out} left no checkpoint to fine-tune")
    cfg = load_config(
        "finetune",
        [
            *VIT,
            f"data.train={subset}",
            f"data.test={data['test']}",
            f"model.init={init or 'null'}",
            f"run.epochs={tune[0]}",
            f"data.batch_size={tune[1]}",
            "run.progress=false",
            "run.ckpt_every=100000",
            "run.keep=1",
            *overrides,
            f"run.seed={seed}",
            f"run.out={run_out}-finetune",
            "run.overwrite=true",
        ],
    )
    trained = train(cfg)
    classifier = trained.model.model.eval()
    device = next(classifier.parameters()).device
    logits, labels = extract_features(classifier, build_loader(cfg, "test", device, train=False))
    return float((logits.argmax(1) == labels).float().mean())


def _start_from(path: Path, start_from: Path | None, settings: dict[str, Any]) -> None:
    """Write ``start_from``'s runs to ``path`` when ``path`` does not exist yet (a fresh clone's study or curves
    start from the committed ones); :class:`ValueError` naming the differing settings if it was recorded under
    other settings than ``settings``. Nothing is written then, or when ``start_from`` is ``None``."""
    if start_from is None or path.exists():
        return
    earlier = RunScores.load(start_from)
    if earlier.settings != settings:
        changed = sorted(k for k in {*settings, *earlier.settings} if settings.get(k) != earlier.settings.get(k))
        raise ValueError(f"start_from {start_from} was recorded under other settings (differing: {changed})")
    RunScores(runs=earlier.runs, settings=settings).save(path)


def run_curves(
    arms: Sequence[str] = CURVE_ARMS,
    seed: int = 0,
    out: Path = Path("runs/study"),
    overrides: Sequence[str] = (),
    epochs: int = CURVE_EPOCHS,
    every: int = CURVE_EVERY,
    quick: bool = False,
    log: Callable[[str], object] = print,
    start_from: Path | None = None,
) -> RunScores:
    """Budget curves: each arm trained once for ``epochs`` on the study's data, evaluated every ``every`` epochs.

    Each arm's checkpoints (one every ``every`` epochs) are evaluated by kNN and a linear probe, and so is its
    encoder at random initialisation (0 updates). Every checkpoint comes from the same run, whose learning-rate
    schedule is set for ``epochs``: a run planned for fewer epochs would have decayed its rate sooner, so the
    early points understate what that shorter budget gives. Results go to ``out/curves.json``
    (``runs[arm][str(updates)]``, resumable per arm: an arm is drawn again when its recipe has changed, see
    :func:`arm_fingerprint`; an arm a stopped sitting was training goes on from its last checkpoint) and
    ``out/curves.png``. ``start_from``: saved curves (``curves.json``, or :data:`README_CURVE_FIGURES` on a fresh
    clone) that ``out`` starts from when it holds no ``curves.json`` yet, as :func:`run_study`'s: its curves drawn as
    they are now are kept, the rest drawn; its settings must be these (:class:`ValueError` otherwise).
    """
    import torch

    from masklab.recipes.build import build_model
    from masklab.recipes.checkpoint import checkpoint_updates, list_checkpoints
    from masklab.recipes.config import load_config
    from masklab.recipes.trained import load_trained

    if epochs < 1 or not 1 <= every <= epochs:
        raise ValueError(f"need epochs >= 1 and 1 <= every <= epochs, got epochs={epochs}, every={every}")
    chosen = [_arm_for(name) for name in arms]
    out.mkdir(parents=True, exist_ok=True)
    data, _, _, _ = _study_data(out, quick)
    common = _common(data, epochs, quick, overrides)
    length = QUICK["length"] if quick else STUDY_DATA["length"]
    settings = {"epochs": epochs, "every": every, "seed": seed, "length": length, "common": common}
    path = out / "curves.json"
    _start_from(path, start_from, settings)
    result, loaders = RunScores.load_or_new(path, settings), {}
    for arm in chosen:
        config = arm_fingerprint(arm, common)
        run_out = out / f"curve-{arm.name}"
        first = result.runs.get(arm.name, {}).get("0", {})
        if first and first.get("config") != config and recorded_as_now(run_out, arm, common):
            first["config"] = config  # drawn before a setting masklab gained since, at its default
            result.save(path)
        if first.get("config") == config:  # drawn already, as it is now
            if _place_curve(result.runs[arm.name], arm.name, run_out):  # recorded before placements were
                result.save(path)
            continue
        own = [*arm.overrides, *common, f"run.seed={seed}", f"run.out={run_out}"]
        cfg = load_config(arm.recipe, own)
        torch.manual_seed(seed)
        points = {"0": {**_evaluate(cfg, build_model(cfg).eval(), loaders), "updates": 0}}
        per_epoch = length // cfg.data.batch_size  # the loader drops the last partial batch
        own += [f"run.ckpt_every={every * per_epoch}", "run.keep=1000"]
        # A curve an earlier sitting stopped goes on from its last checkpoint (one every ``every`` epochs), as a
        # study run does; the time that sitting logged counts.
        _, _, seconds, resumed = _train_resumable(arm, own, log)
        if resumed:
            points["0"]["resumed"] = resumed
        for checkpoint in list_checkpoints(run_out / "checkpoints"):
            cfg, model = load_trained(checkpoint)
            updates = checkpoint_updates(checkpoint)
            points[str(updates)] = {**_evaluate(cfg, model, loaders), "updates": updates}
            log(
                f"{arm.name} at {updates} updates: kNN {points[str(updates)]['knn']:.3f}, linear "
                f"{points[str(updates)]['linear']:.3f}"
            )
        points["0"].update(train_seconds=seconds, config=config)
        _place_curve(points, arm.name, run_out)
        result.runs[arm.name] = points
        result.save(path)
    plot_curves(result, out / "curves.png", budget=STUDY_EPOCHS * (length // STUDY_BATCH))
    return result


def _place_curve(points: dict[str, dict[str, Any]], name: str, run_out: Path) -> bool:
    """Record :data:`CURVE_MASKS`' placements at each of the curve's checkpoints that lacks them; whether any was."""
    from masklab.recipes.checkpoint import checkpoint_updates, list_checkpoints

    masks, added = CURVE_MASKS.get(name, ()), False
    for checkpoint in list_checkpoints(run_out / "checkpoints") if masks else ():
        point = points.get(str(checkpoint_updates(checkpoint)))
        if point is not None and "placement" not in point:
            point["placement"] = _drawn_from(checkpoint, masks)
            added = True
    return added


def curve_placement_table(curves: RunScores) -> str:
    """Per mask of :data:`CURVE_MASKS`, the object's share of its masked / visible cells when drawn from the
    curve's checkpoint at each number of updates; empty without any recorded."""
    columns: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for name, points in curves.runs.items():
        for point in points.values():
            for mask, placed in (point.get("placement") or {}).items():
                columns.setdefault((name, mask), {})[int(point["updates"])] = placed
    if not columns:
        return ""
    updates = sorted({u for placed in columns.values() for u in placed})
    lines = ["| mask, from | " + " | ".join(f"{u} updates" for u in updates) + " |", "|---|" + "---:|" * len(updates)]
    for (name, mask), placed in columns.items():
        cells = [f"{placed[u]['masked']:.3f} / {placed[u]['visible']:.3f}" if u in placed else "" for u in updates]
        lines.append(f"| {mask}, from {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(result: RunScores, path: Path, budget: int | None = None) -> None:
    """kNN and linear-probe accuracy against updates, one line per arm; a dotted line at the study's ``budget``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, metric, title in zip(axes, ("knn", "linear"), ("kNN accuracy", "linear-probe accuracy"), strict=True):
        for name, points in result.runs.items():
            rows = sorted(points.values(), key=lambda r: r["updates"])
            ax.plot([r["updates"] for r in rows], [r[metric] for r in rows], "o-", ms=3, label=name)
        if budget:
            ax.axvline(budget, color="k", ls=":", lw=1, label=f"study budget ({budget} updates)")
        ax.set_title(title)
        ax.set_xlabel("optimizer updates (0: random init)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"budget curves on the study's data: checkpoints of one run per baseline, seed {result.settings.get('seed', 0)}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean(result: RunScores, name: str, metric: str) -> float:
    return _summary([r[metric] for r in result.runs[name].values()])[0]


BAR = 0.05
"""Issue 20's bar: every self-supervised arm at least this far above its backbone's random-init row."""


BELOW_BAR: dict[str, str] = {
    "mae_amt": (
        "on the linear probe it is within the seed spread of its random init, and it fine-tunes below its random "
        "init beyond the spread. Its control (`mae_random_throw`, the same ratios on random cells) clears the bar "
        "and is above `mae_amt` beyond the spread on kNN and the linear probe, so AMT's attention-driven choice of "
        "cells, not its ratios, is what fails here. Its first refresh comes at a tenth of the run (the paper's "
        "schedule as a fraction), before MAE's own attention has found the object (the curve placements above), "
        "and its trained masks do not favour the object the same way from seed to seed (the placement table "
        "below). The data change tried (flat backgrounds, one seed) did not help. With its first refresh at two "
        "thirds of the run (`mae_amt_late`, a diagnostic, not the paper's schedule) it clears the bar, level with "
        "MAE within the spread on every evaluation, and its masks cover the object more than a random mask in "
        "every seed: at this setting AMT's masks hold MAE back when they start at a tenth of the run, not once "
        "MAE's attention has found the object (as in the study's earlier class-token reading, issue 20's notes)."
    ),
    "mae_amt_equal_time": (
        "the equal-time reading does not change `mae_amt`'s. With the updates its faster steps buy in MAE's "
        "training time it is within the seed spread of `mae_amt` at equal updates on every evaluation, within the "
        "spread of its random init on the linear probe, and below MAE beyond the spread on every evaluation. As "
        "for `mae_amt`, its trained masks do not favour the object the same way from seed to seed (the placement "
        "table below): the extra updates train on under the same early-refreshed masks."
    ),
    "simmim_amt_equal_time": (
        "the equal-time reading does not change `simmim_amt`'s either. With the updates its faster steps buy in "
        "SimMIM's training time it is within the seed spread of `simmim_amt` at equal updates and of its random "
        "init on every evaluation, and below SimMIM beyond the spread on the linear probe and on fine-tuning. As "
        "for `simmim_amt`, its trained masks leave the object visible and mask the background in two of its three "
        "seeds (the placement table below)."
    ),
    "simmim_amt": (
        "it is within the seed spread of its random-init row on the linear probe and on fine-tuning, and below "
        "SimMIM beyond the spread on every evaluation. Its control (`simmim_random_throw`, its counts on random "
        "cells) clears the bar and is level with SimMIM within the spread on every evaluation, and `simmim_amt` is "
        "below its control beyond the spread on the linear probe: the few cells left visible are not what fails, "
        "AMT's choice of cells is. Its trained masks leave the object visible and mask the background in two of "
        "its three seeds, the opposite of what AMT's masks rest on; drawn from SimMIM's own trained checkpoints "
        "AMT's masks do so in every seed, where drawn from MAE's they mask the object (the placement table "
        "below): the class-token attention AMT reads rests on the background in a SimMIM encoder. With its first "
        "refresh at two thirds of the run (`simmim_amt_late`, a diagnostic) it clears the bar on the linear probe, "
        "within the spread of SimMIM and of the control on every evaluation, while its masks still leave the "
        "object visible in every seed: moving the refresh later does not place the masks on the object."
    ),
}
"""Self-supervised arms measured below :data:`BAR` at the study's setting, each with what the study measured of
why (no figures: they are in the tables). The README's study section prints the entry of every arm whose seeds
are all in and that is below the bar, and its test requires one for each such arm and none for an arm above."""


def bar_gain(result: RunScores, arm: Arm) -> float | None:
    """The bar's reading of an arm: its best gain over its family's random-init row on the evaluations the bar
    names (the linear probe for masked-image arms; kNN or the linear probe for siamese ones); ``None`` for a
    supervised arm or when either row is missing.

    Examples:
        >>> r = RunScores(runs={"random_cnn": {"0": {"knn": 0.2, "linear": 0.3}}, "moco": {"0": {"knn": 0.4, "linear": 0.32}}})
        >>> round(bar_gain(r, Arm("moco", "moco", family="cnn")), 3)
        0.2
    """
    random = f"random_{arm.family}"
    if not arm.self_supervised or arm.name not in result.runs or random not in result.runs:
        return None
    metrics = ("linear",) if arm.family == "vit" else ("knn", "linear")
    gains = [
        _mean(result, arm.name, m) - _mean(result, random, m)
        for m in metrics
        if _values(result, arm.name, m) and _values(result, random, m)
    ]
    return max(gains) if gains else None


def study_seeds(result: RunScores) -> list[str]:
    """The study's seeds, in order: every seed recorded for any arm (each arm runs them all)."""
    return sorted({seed for runs in result.runs.values() for seed in runs})


def all_seeds_in(result: RunScores, name: str) -> bool:
    """Whether arm ``name`` has a run for every one of :func:`study_seeds`."""
    return set(result.runs.get(name, {})) == set(study_seeds(result))


def below_bar(result: RunScores, arms: Sequence[Arm] = STUDY_ARMS) -> list[str]:
    """The self-supervised arms whose seeds are all in (:func:`all_seeds_in`) and whose :func:`bar_gain` is
    under :data:`BAR`."""
    return [
        arm.name
        for arm in arms
        if all_seeds_in(result, arm.name) and (gain := bar_gain(result, arm)) is not None and gain < BAR
    ]


def _metrics(result: RunScores) -> tuple[str, ...]:
    has_finetune = any("finetune" in run for runs in result.runs.values() for run in runs.values())
    return ("knn", "linear", "finetune") if has_finetune else ("knn", "linear")


def _values(result: RunScores, name: str, metric: str) -> list[float]:
    return [r[metric] for r in result.runs[name].values() if metric in r]


def _trained_at_once(runs: list[dict[str, Any]]) -> bool:
    """Whether any of an arm's timed runs shared the machine with other runs of the study (``--jobs``)."""
    return any(run.get("at_once", 1) > 1 for run in runs if "images_per_s" in run)


def study_table(result: RunScores, arms: Sequence[Arm] = STUDY_ARMS) -> str:
    """The Markdown table: per arm, updates, images/s, kNN, linear and (masked-image arms) fine-tuned accuracy
    (mean ± std over seeds), and the difference of the means from its baseline."""
    names = [n for n in result.runs if n.startswith("random_")] + [a.name for a in arms if a.name in result.runs]
    baseline = {a.name: a.baseline for a in arms}
    metrics = _metrics(result)
    titles = {"knn": "kNN", "linear": "linear", "finetune": "fine-tuned"}
    header = ["arm", "baseline", "updates", "images/s"]
    for metric in metrics:
        header += [f"{titles[metric]} (mean ± std)", f"Δ {titles[metric]}"]
    lines = ["| " + " | ".join([*header, "seeds"]) + " |", "|---|---|" + "---:|" * (len(header) - 1)]
    for name in names:
        runs = list(result.runs[name].values())
        speed = [r["images_per_s"] for r in runs if "images_per_s" in r]
        updates = sorted({int(r["updates"]) for r in runs})
        shown = str(updates[0]) if len(updates) == 1 else f"{updates[0]}-{updates[-1]}"
        shared = "*" if _trained_at_once(runs) else ""
        cells = [name, baseline.get(name) or "", shown, f"{statistics.mean(speed):.0f}{shared}" if speed else ""]
        for metric in metrics:
            values = _values(result, name, metric)
            if not values:
                cells += ["", ""]
                continue
            mean, std = _summary(values)
            cells.append(f"{mean:.3f} ± {std:.3f}")
            base = baseline.get(name)
            if base in result.runs and _values(result, base, metric):
                cells.append(f"{mean - _mean(result, base, metric):+.3f}")
            else:
                cells.append("")
        cells.append(str(len(runs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def family_metrics(arm: Arm) -> tuple[str, ...]:
    """The evaluations an arm's family is known for: the linear probe and fine-tuning for masked-image
    arms, kNN and the linear probe for siamese and supervised ones."""
    return ("linear", "finetune") if arm.family == "vit" else ("knn", "linear")


def verdict(result: RunScores, name: str, base: str, metric: str) -> str:
    """``Δ`` of the means and whether it is beyond the seed spread (the sum of the two standard deviations).

    Examples:
        >>> r = RunScores(runs={"a": {"0": {"knn": 0.5}, "1": {"knn": 0.7}}, "b": {"0": {"knn": 0.1}, "1": {"knn": 0.1}}})
        >>> verdict(r, "a", "b", "knn")
        '+0.500, above (spread 0.141)'
    """
    arm, other = _values(result, name, metric), _values(result, base, metric)
    (mean, std), (base_mean, base_std) = _summary(arm), _summary(other)
    delta, spread = mean - base_mean, std + base_std
    word = "above" if delta > spread else "below" if delta < -spread else "within the spread"
    return f"{delta:+.3f}, {word} (spread {spread:.3f})"


def reading_table(result: RunScores, arms: Sequence[Arm] = STUDY_ARMS) -> str:
    """Per arm, on its family's evaluations: its gain over the random-init encoder (against :data:`BAR`), and
    against its baseline (and its control, if it has one) whether the difference is beyond the seed spread, next
    to the published claim."""
    lines = [
        "| arm | evaluation | over random init | against its baseline (; its control) | published claim, at its scale |",
        "|---|---|---|---|---|",
    ]
    for arm in arms:
        if arm.name not in result.runs:
            continue
        random = f"random_{arm.family}"
        for metric in family_metrics(arm):
            if not _values(result, arm.name, metric):
                continue
            cells = [arm.name, {"knn": "kNN", "linear": "linear", "finetune": "fine-tuned"}[metric]]
            if random in result.runs and _values(result, random, metric):
                gain = _mean(result, arm.name, metric) - _mean(result, random, metric)
                cells.append(f"{gain:+.3f} ({'clears' if gain >= BAR else 'below'} +{BAR:.2f})")
            else:
                cells.append("")
            against = [
                f"{other}: {verdict(result, arm.name, other, metric)}"
                for other in (arm.baseline, arm.control)
                if other in result.runs and _values(result, other, metric)
            ]
            cells.append("; ".join(against))
            cells.append(arm.claim if metric == family_metrics(arm)[0] else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def placement_table(result: RunScores, arms: Sequence[Arm] = STUDY_ARMS) -> str:
    """Per arm with patch masks, where its trained masks land (:func:`~masklab.tools.placement.mask_placement`,
    recorded as each run's ``placement``): the object's mean share of the cells it masks, throws and keeps
    visible, and of all cells, mean over seeds (± std for the masked cells); empty without any. Under a
    baseline, a row per mask of :data:`BASELINE_MASKS` drawn from its checkpoints (``placement_of``)."""
    lines = [
        "| arm | masked (mean ± std) | thrown | visible | all cells | seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for arm in arms:
        runs = result.runs.get(arm.name, {}).values()
        rows.append((arm.name, [r["placement"] for r in runs if r.get("placement")]))
        for mask in BASELINE_MASKS.get(arm.name, ()):
            of = [r["placement_of"][mask] for r in runs if (r.get("placement_of") or {}).get(mask)]
            rows.append((f"{mask}'s mask from {arm.name}'s checkpoints", of))
    for label, placed in rows:
        if not placed:
            continue
        cells = [label]
        for state in ("masked", "thrown", "visible", "all"):
            values = [p[state] for p in placed if state in p]
            if not values:
                cells.append("")
            elif state == "masked":
                cells.append("{:.3f} ± {:.3f}".format(*_summary(values)))
            else:
                cells.append(f"{statistics.mean(values):.3f}")
        lines.append("| " + " | ".join([*cells, str(len(placed))]) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def curves_table(curves: RunScores) -> str:
    """Per budget-curve arm, kNN / linear at each evaluated number of updates."""
    updates = sorted({int(k) for points in curves.runs.values() for k in points})
    lines = ["| arm | " + " | ".join(f"{u} updates" for u in updates) + " |", "|---|" + "---:|" * len(updates)]
    for name, points in curves.runs.items():
        cells = [
            f"{points[str(u)]['knn']:.3f} / {points[str(u)]['linear']:.3f}" if str(u) in points else "" for u in updates
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def study_markdown(
    result: RunScores,
    arms: Sequence[Arm] = STUDY_ARMS,
    plot: str | None = "results.png",
    curves: RunScores | None = None,
    curves_plot: str | None = README_CURVES,
) -> str:
    """What ``masklab study --readme`` puts in a README: the data and budget, the budget curves (if given),
    the table, the plot and the reading against random init, baselines and the papers' claims."""
    settings = result.settings
    data = settings.get("data", {})
    seeds = study_seeds(result)
    minutes = sum(run["seconds"] for runs in result.runs.values() for run in runs.values() if "seconds" in run) / 60
    length = settings.get("length", 4000)
    # The batch the runs trained at: the last data.batch_size the study set (the GPU preset's), else the default.
    batch = [int(o.split("=", 1)[1]) for o in settings.get("common", []) if o.startswith("data.batch_size=")]
    lines = [
        f"Built-in shapes ({data.get('background', 'textured')} backgrounds), {data.get('size', 32)} px, "
        f"{length} training and {length // 4} test images; {settings.get('epochs', '?')} epochs at batch {(batch or [STUDY_BATCH])[-1]} "
        f"for every arm; seeds {', '.join(seeds)}; {minutes:.0f} min of runs on this machine."
        + (
            f" Masked-image arms are also fine-tuned on the first {FINETUNE['fraction']:.0%} of the training images "
            f"for {settings.get('finetune_epochs', FINETUNE['epochs'])} epochs."
            if "finetune" in _metrics(result)
            else ""
        )
        + " Δ: the arm's mean minus its baseline's.",
        "",
    ]
    if curves is not None:
        minutes_curves = sum(p.get("train_seconds", 0) for points in curves.runs.values() for p in points.values()) / 60
        lines += [
            f"Budget curves (kNN / linear; one run per baseline for {curves.settings.get('epochs')} epochs, seed "
            f"{curves.settings.get('seed')}, a checkpoint every {curves.settings.get('every')} epochs; "
            f"{minutes_curves:.0f} min of training):",
            "",
            curves_table(curves).rstrip(),
            "",
        ]
        if curves_plot:
            lines += [f"![budget curves]({curves_plot})", ""]
        placed = curve_placement_table(curves)
        if placed:
            sample = next(
                p for points in curves.runs.values() for pt in points.values() for p in pt.get("placement", {}).values()
            )
            lines += [
                "Where the masks that read a model's attention would land if drawn from the curve's checkpoints "
                f"(`CURVE_MASKS`): the object's share of the masked / visible cells, over the first {PLACEMENT_IMAGES} "
                f"held-out images, whose cells are {sample['all']:.3f} object overall:",
                "",
                placed.rstrip(),
                "",
            ]
    missing = [arm.name for arm in arms if not all_seeds_in(result, arm.name)]
    if missing:
        lines += [
            f"A study in progress: {len(arms) - len(missing)} of {len(arms)} arms have all their seeds; still to "
            f"run at this setting: {', '.join(missing)} (the study resumes where it stopped).",
            "",
        ]
    lines += [study_table(result, arms).rstrip(), ""]
    if any(_trained_at_once(list(result.runs[a.name].values())) for a in arms if a.name in result.runs):
        lines += [
            "images/s marked *: runs trained several at once (`--jobs`), each with its share of the cores; "
            "the others one at a time on every core, so the two kinds of figure do not compare.",
            "",
        ]
    if plot:
        lines += [f"![study]({plot})", ""]
    lines += [
        f"The reading, on each family's evaluations: the gain over the random-init encoder of the same family "
        f"(the bar: +{BAR:.2f}), and the difference from the baseline, called above or below only when it "
        "exceeds the sum of the two seed standard deviations; next to what the papers report (METHODS.md; the "
        "AMT and EHM figures are from their abstracts):",
        "",
        reading_table(result, arms).rstrip(),
        "",
    ]
    below = below_bar(result, arms)
    if below:
        lines += ["Below the bar at this setting, and what the study measured of why:", ""]
        lines += [f"- **{name}**: {BELOW_BAR.get(name, 'not looked into yet.')}" for name in below] + [""]
    placements = placement_table(result, arms)
    if placements:
        lines += [
            "Where each arm's trained masks land: its own mask stage, guided by its final checkpoint, drawn over "
            f"the first {PLACEMENT_IMAGES} held-out images (whole), and the object's mean share of the cells in "
            "each state (`masklab.tools.placement`). A random mask gives every state the share of all cells; the "
            "informed masks of AMT and AttMask rest on masking the object more than that. Under MAE and SimMIM, "
            "where their AMT variant's mask would land guided by the baseline's own trained checkpoints "
            "(`BASELINE_MASKS`), apart from what training under that mask does to the encoder:",
            "",
            placements.rstrip(),
            "",
        ]
    return "\n".join(lines)


def plot_study(result: RunScores, arms: Sequence[Arm], path: Path, chance: float | None = None) -> None:
    """Bars of the mean accuracy per arm (kNN and linear side by side), a dot per seed, a line at ``chance``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result.runs if n.startswith("random_")] + [a.name for a in arms if a.name in result.runs]
    is_baseline = {a.name: a.baseline is None for a in arms}
    metrics = _metrics(result)
    titles = {"knn": "kNN accuracy", "linear": "linear-probe accuracy", "finetune": "fine-tuned (10% labels)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 0.42 * len(names) + 1.4), sharey=True)
    for ax, metric in zip(axes, metrics, strict=True):
        title = titles[metric]
        for row, name in enumerate(names):
            values = _values(result, name, metric)
            if not values:
                continue
            mean, std = _summary(values)
            colour = "0.6" if name.startswith("random_") else ("tab:blue" if is_baseline.get(name) else "tab:orange")
            ax.barh(row, mean, xerr=std, color=colour, alpha=0.8, capsize=3)
            ax.plot(values, [row] * len(values), "k.", ms=4)
        if chance is not None:
            ax.axvline(chance, color="k", ls=":", lw=1, label=f"chance ({chance:.3f})")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title)
        top = max(r[m] for runs in result.runs.values() for r in runs.values() for m in metrics if m in r)
        ax.set_xlim(0, min(1.0, 1.2 * top))
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("masklab study on shapes: baselines blue, methods orange, random init grey; dots are seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
