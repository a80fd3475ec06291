"""The study: every method against its baseline on the built-in shapes, equal steps, several seeds.

Each *arm* is a recipe plus the overrides that put it on its family's
backbone: the masked-image-modelling arms (MAE, SimMIM, AMT, EHM) train a
4-block ViT-tiny at patch 4, the siamese arms (MoCo v2, MixMask, BYOL,
MaskDeep) and the supervised ones a narrow ResNet-18 (widths 16-128, the
small-image stem). Every arm sees the same data with the same batch size
for the same number of epochs, so the same number of optimizer updates;
then kNN and a linear probe on the frozen encoder. A random-init row per
family says what the encoder gives before any training.

Results go to ``results.json`` (every run, rewritten after each one, so a
stopped study resumes where it stopped), ``results.md`` (the table) and
``results.png`` (the plot).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masklab.recipes.demo import RunScores

__all__ = ["STUDY_ARMS", "Arm", "plot_study", "run_study", "study_markdown", "study_table"]

README_PLOT = "docs/study.png"
README_FIGURES = "docs/study.json"

VIT = ("model.kwargs={depth: 4}",)
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


STUDY_ARMS: tuple[Arm, ...] = (
    Arm("mae", "mae", None, VIT, "vit"),
    Arm(
        "mae_amt",
        "mae_amt",
        "mae",
        VIT,
        "vit",
        "+2.9 to +5.9 points of MAE's linear-probe accuracy on CIFAR-10/100, STL-10, Tiny ImageNet and ImageNet-1K",
    ),
    Arm("simmim", "simmim", None, VIT, "vit"),
    Arm("simmim_amt", "simmim_amt", "simmim", VIT, "vit", "better fine-tuning accuracy than SimMIM"),
    Arm(
        "ehm",
        "ehm",
        "mae",
        VIT,
        "vit",
        "+1.1 points on ImageNet-1K classification and +1.4 on ADE20K segmentation at equal epochs",
    ),
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
"""The issue-10 study: MAE, MAE+AMT, SimMIM, SimMIM+AMT, EHM, MoCo v2, MixMask-MoCo, BYOL, MaskDeep,
supervised with and without MixMask. Supervised arms turn patch erasing off so MixMask is the only difference."""

STUDY_EPOCHS = 4
"""4 epochs of 4000 images at batch 128: 124 updates an arm, 33 runs in under an hour on 2 CPU cores."""

QUICK = {"length": 512, "epochs": 1, "linear_epochs": 20, "seeds": (0,)}
"""``--quick``: 512 images, one epoch (4 updates), one seed; the whole study in about two minutes."""


def _arm_for(name: str) -> Arm:
    known = {arm.name: arm for arm in STUDY_ARMS}
    if name in known:
        return known[name]
    from masklab.recipes.config import _resolve

    _resolve(name)  # a recipe name or YAML file, else FileNotFoundError naming what exists
    return Arm(name, name)


def run_study(
    arms: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    out: Path = Path("runs/study"),
    overrides: Sequence[str] = (),
    epochs: int | None = None,
    quick: bool = False,
    log=print,
) -> RunScores:
    """Train every arm with every seed on the built-in shapes, evaluate kNN and a linear probe.

    Args:
        arms: names from :data:`STUDY_ARMS`, or other recipe names / YAML files
            (run as they are); ``None`` runs all of :data:`STUDY_ARMS`.
        seeds: one run per arm and seed.
        out: the study's folder: data, one run folder per arm and seed, results.
        overrides: dotted overrides applied to every run, after the arm's own.
        epochs: epochs per run (the same for every arm, so the same updates; default :data:`STUDY_EPOCHS`).
        quick: :data:`QUICK`'s smaller data, one epoch, one seed (a smoke run).

    Runs already in ``out/results.json`` with the same settings are kept, not
    rerun. Returns every run's scores; writes ``results.md`` and ``results.png``.
    """
    from masklab.pipeline import read_info, write_text_atomically
    from masklab.recipes.demo import write_shapes

    chosen = [_arm_for(name) for name in (arms or [a.name for a in STUDY_ARMS])]
    length = QUICK["length"] if quick else 4000
    epochs = STUDY_EPOCHS if epochs is None else epochs
    if quick:
        epochs, seeds = QUICK["epochs"], QUICK["seeds"]
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if not seeds:
        raise ValueError("give at least one seed")
    out.mkdir(parents=True, exist_ok=True)
    data = write_shapes(out / "data", length=length)
    common = [
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
    settings = {"epochs": epochs, "length": length, "common": common}
    path = out / "results.json"
    result = RunScores.load_or_new(path, settings)
    families, loaders = {arm.family for arm in chosen}, {}
    jobs = [(f"random_{family}", None, family) for family in sorted(families)] + [
        (arm.name, arm, arm.family) for arm in chosen
    ]
    for name, arm, family in jobs:
        for seed in seeds:
            done = result.runs.get(name, {}).get(str(seed))
            if done is not None and done.get("overrides") == list(arm.overrides if arm else ()):
                continue
            start = time.perf_counter()
            scores = _run_one(arm, family, seed, common, out / f"{name}-seed{seed}", loaders)
            scores["seconds"] = time.perf_counter() - start
            scores["overrides"] = list(arm.overrides if arm else ())
            result.runs.setdefault(name, {})[str(seed)] = scores
            result.save(path)
            log(
                f"{name} seed {seed}: kNN {scores['knn']:.3f}, linear {scores['linear']:.3f}, "
                f"{scores['updates']} updates, {scores['seconds']:.0f} s"
            )
    write_text_atomically(out / "results.md", study_table(result, chosen))

    plot_study(result, chosen, out / "results.png", chance=1 / read_info(data["train"]).num_classes)
    return result


def _run_one(
    arm: Arm | None, family: str, seed: int, common: list[str], run_out: Path, loaders: dict
) -> dict[str, Any]:
    """Train one arm (or, for ``arm=None``, build the family's random-init encoder) and evaluate it."""
    import torch

    from masklab.recipes.build import build_loader, build_model, encoder_of, family_of
    from masklab.recipes.config import load_config
    from masklab.recipes.train import evaluate_encoder, train

    if arm is None:  # the family's encoder at random initialisation, on a reference recipe's model
        recipe, extra = ("mae", VIT) if family == "vit" else ("byol", CNN)
        cfg = load_config(recipe, [*extra, *common, f"run.seed={seed}", f"run.out={run_out}"])
        torch.manual_seed(seed)
        model, updates = build_model(cfg).eval(), 0
    else:
        # A run that did not finish (its scores are not in results.json) is trained again from the start.
        again = [f"run.seed={seed}", f"run.out={run_out}", "run.overwrite=true"]
        cfg = load_config(arm.recipe, [*arm.overrides, *common, *again])
        trained = train(cfg)
        model, updates = trained.model.eval(), trained.updates
    device = next(model.parameters()).device
    key = (str(device), cfg.data.train, cfg.data.test, cfg.data.resolution, cfg.data.batch_size)
    key += (tuple(cfg.data.mean), tuple(cfg.data.std))
    if key not in loaders:  # every arm evaluates on the same whole, centred images: compile them once
        loaders[key] = tuple(build_loader(cfg, split, device, train=False) for split in ("train", "test"))
    scores = evaluate_encoder(cfg, encoder_of(model), device, family_of(model), ("knn", "linear"), loaders[key])
    return {**scores, "updates": updates}


def _summary(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean(result: RunScores, name: str, metric: str) -> float:
    return _summary([r[metric] for r in result.runs[name].values()])[0]


def study_table(result: RunScores, arms: Sequence[Arm] = STUDY_ARMS) -> str:
    """The Markdown table: per arm, updates, kNN and linear accuracy (mean ± std over seeds), and the
    difference of the means from its baseline."""
    names = [n for n in result.runs if n.startswith("random_")] + [a.name for a in arms if a.name in result.runs]
    baseline = {a.name: a.baseline for a in arms}
    lines = [
        "| arm | baseline | updates | kNN (mean ± std) | Δ kNN | linear (mean ± std) | Δ linear | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        runs = list(result.runs[name].values())
        cells = [name, baseline.get(name) or "", str(int(runs[0]["updates"]))]
        for metric in ("knn", "linear"):
            mean, std = _summary([r[metric] for r in runs])
            cells.append(f"{mean:.3f} ± {std:.3f}")
            base = baseline.get(name)
            if base in result.runs:
                cells.append(f"{mean - _mean(result, base, metric):+.3f}")
            else:
                cells.append("")
        cells.append(str(len(runs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def study_markdown(result: RunScores, arms: Sequence[Arm] = STUDY_ARMS, plot: str | None = "results.png") -> str:
    """The table, the scale it was measured at, and the plot: what ``masklab study --readme`` puts in a README."""
    settings = result.settings
    seeds = sorted({seed for runs in result.runs.values() for seed in runs})
    minutes = sum(run["seconds"] for runs in result.runs.values() for run in runs.values() if "seconds" in run) / 60
    lines = [
        f"Built-in shapes, 32 px, {settings.get('length', '?')} training and {settings.get('length', 4) // 4} test "
        f"images, {settings.get('epochs', '?')} epochs at batch 128 for every arm, seeds {', '.join(seeds)}; "
        f"{minutes:.0f} min of runs. Δ: the arm's mean minus its baseline's.",
        "",
        study_table(result, arms).rstrip(),
        "",
    ]
    if plot:
        lines += [f"![study]({plot})", ""]
    claims = claims_table(result, arms)
    if claims:
        lines += ["Next to what the papers report (METHODS.md; the AMT and EHM figures are from their abstracts):", ""]
        lines += [claims.rstrip(), ""]
    return "\n".join(lines)


def claims_table(result: RunScores, arms: Sequence[Arm] = STUDY_ARMS) -> str:
    """Each arm with a published claim: the claim, and its Δ kNN / Δ linear against its baseline here."""
    lines = ["| arm against baseline | published claim, at its scale | here: Δ kNN / Δ linear |", "|---|---|---:|"]
    for arm in arms:
        if not arm.claim or arm.name not in result.runs or arm.baseline not in result.runs:
            continue
        deltas = [f"{_mean(result, arm.name, m) - _mean(result, arm.baseline, m):+.3f}" for m in ("knn", "linear")]
        lines.append(f"| {arm.name} against {arm.baseline} | {arm.claim} | {' / '.join(deltas)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def plot_study(result: RunScores, arms: Sequence[Arm], path: Path, chance: float | None = None) -> None:
    """Bars of the mean accuracy per arm (kNN and linear side by side), a dot per seed, a line at ``chance``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result.runs if n.startswith("random_")] + [a.name for a in arms if a.name in result.runs]
    is_baseline = {a.name: a.baseline is None for a in arms}
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(names) + 1.4), sharey=True)
    for ax, metric, title in zip(axes, ("knn", "linear"), ("kNN accuracy", "linear-probe accuracy"), strict=True):
        for row, name in enumerate(names):
            values = [r[metric] for r in result.runs[name].values()]
            mean, std = _summary(values)
            colour = "0.6" if name.startswith("random_") else ("tab:blue" if is_baseline.get(name) else "tab:orange")
            ax.barh(row, mean, xerr=std, color=colour, alpha=0.8, capsize=3)
            ax.plot(values, [row] * len(values), "k.", ms=4)
        if chance is not None:
            ax.axvline(chance, color="k", ls=":", lw=1, label=f"chance ({chance:.3f})")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title)
        top = max(r[m] for runs in result.runs.values() for r in runs.values() for m in ("knn", "linear"))
        ax.set_xlim(0, min(1.0, 1.2 * top))
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("masklab study on shapes: baselines blue, methods orange, random init grey; dots are seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
