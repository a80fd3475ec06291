"""``make gpu-check``: the device-aware tests, the stage benchmarks and training-step timings on one device.

Run through ``tools/gpu_check.sh`` (which makes ``import masklab`` work from any folder and installs the
carried wheels), or directly from a checkout: ``python tools/gpu_check.py --device cuda --out runs/gpu-check``.
Each step runs in a fresh process with its own timeout; one that fails or runs past it is reported and the
check goes on. Writes ``gpu.md`` (a readable report) and ``gpu.json`` (every step's status, wall time and
figures) to ``--out``; exits 1 if any step failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from masklab.recipes.demo import RunScores
from masklab.tools.bench import figure_tables
from masklab.tools.study import study_table

ROOT = Path(__file__).resolve().parent.parent

# Training-step timings per recipe: the GPU sizes (224 px, the papers' encoders) and tiny CPU ones.
_VIT_B = ["model.backbone=vit_base_patch16_224", "model.patch_size=16", "model.kwargs={}"]
_MAE_DECODER = ["objective.decoder_dim=512", "objective.decoder_depth=8"]
_R50 = ["model.backbone=resnet50", "model.kwargs={}", "model.small_stem=false"]
GPU_RECIPES: dict[str, list[str]] = {
    "mae": [*_VIT_B, *_MAE_DECODER, "data.batch_size=256"],
    "mae_amt": [*_VIT_B, *_MAE_DECODER, "data.batch_size=256"],
    "ehm": [*_VIT_B, *_MAE_DECODER, "data.batch_size=256"],
    "moco": [*_R50, "data.batch_size=256"],
    "mixmask_moco": [*_R50, "data.batch_size=256"],
    "maskdeep": [*_R50, "mask.strides=[8, 16, 32]", "data.batch_size=128"],
}
GPU_STUDY_ARMS = ("mae", "mae_amt")
"""The study's arms the check runs at the GPU preset (with the random-init ViT): the whole preset outlasts a lease."""

_VIT_TINY = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"]
_TINY_DECODER = ["objective.decoder_dim=32", "objective.decoder_depth=1"]
_CNN_TINY = ["model.kwargs={channels: [8, 16, 32, 64], stem_width: 8}"]
_HEADS_TINY = ["objective.proj_hidden=32", "objective.proj_dim=16", "objective.pred_hidden=32"]
CPU_RECIPES: dict[str, list[str]] = {
    "mae": [*_VIT_TINY, *_TINY_DECODER],
    "mae_amt": [*_VIT_TINY, *_TINY_DECODER],
    "ehm": [*_VIT_TINY, *_TINY_DECODER],
    "moco": [*_CNN_TINY, *_HEADS_TINY, "objective.queue_size=64"],
    "mixmask_moco": [*_CNN_TINY, *_HEADS_TINY, "objective.queue_size=64"],
    "maskdeep": [*_CNN_TINY, *_HEADS_TINY, "mask.groups=2"],
}


@dataclass
class StepResult:
    """One step of the check: its command, how it ended (``passed``, ``failed``, ``timed out``, ``not run``) and its figures."""

    name: str
    command: list[str]
    status: str
    seconds: float
    tail: str = ""  # the end of its output, when it did not pass
    figures: dict[str, Any] | None = None  # what its --json wrote


@dataclass
class CheckResult:
    device: str  # the device's name (torch.cuda.get_device_name, or "cpu")
    torch: str
    date: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    steps: list[StepResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(step.status == "passed" for step in self.steps)

    @classmethod
    def load(cls, path: Path) -> CheckResult:
        """The check saved in a ``gpu.json``."""
        saved = json.loads(Path(path).read_text())
        steps = [StepResult(**step) for step in saved["steps"]]
        return cls(device=saved["device"], torch=saved["torch"], date=saved["date"], steps=steps)

    @classmethod
    def merge(cls, results: list[CheckResult]) -> CheckResult:
        """One check from the calls a device lease split it into (``--skip study``, then ``--only study``).

        The steps keep the order of the calls; a step run again in a later call replaces the earlier one in its
        place. The date is the last call's.

        Raises:
            ValueError: no results, or results from different devices or torch versions (one report names one).
        """
        if not results:
            raise ValueError("merge needs at least one gpu.json")
        machines = sorted({(r.device, r.torch) for r in results})
        if len(machines) > 1:
            raise ValueError(f"cannot merge checks from different devices or torch versions: {machines}")
        steps: dict[str, StepResult] = {}
        for result in results:
            steps.update((step.name, step) for step in result.steps)
        return cls(device=results[0].device, torch=results[0].torch, date=results[-1].date, steps=list(steps.values()))


def run_step(
    name: str,
    command: list[str],
    timeout: float,
    json_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], object] = print,
) -> StepResult:
    """Run ``command`` in a fresh process; a non-zero exit, a missing ``json_path`` or ``timeout`` fails it."""
    log(f"== {name}: {' '.join(command)}")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        output = done.stdout + done.stderr
        status = "passed" if done.returncode == 0 else "failed"
        if status == "passed" and json_path is not None and not json_path.exists():
            status, output = "failed", output + f"\nexited 0 but wrote no {json_path.name}"
    except subprocess.TimeoutExpired as expired:
        partial = expired.stdout or b""
        output = (
            partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        ) + f"\nran past {timeout:.0f} s"
        status = "timed out"
    seconds = time.perf_counter() - start
    log(output.rstrip()[-3000:])
    log(f"== {name}: {status} in {seconds:.0f} s")
    # A step stopped at its timeout keeps what it saved as it went (the study writes results.json after each run).
    keep = status == "passed" or (status == "timed out" and json_path is not None and json_path.exists())
    figures = json.loads(json_path.read_text()) if keep and json_path is not None else None
    tail = "" if status == "passed" else "\n".join(output.rstrip().splitlines()[-25:])
    return StepResult(name, command, status, seconds, tail, figures)


def report_markdown(result: CheckResult) -> str:
    """The report: the device, a table of steps, then each step's figures and each failure's output."""
    total = sum(step.seconds for step in result.steps)
    verdict = "all steps passed" if result.passed else "SOME STEPS FAILED"
    lines = [
        f"# masklab gpu-check on {result.device}",
        "",
        f"{result.date}, torch {result.torch}, {total / 60:.1f} min in all: {verdict}.",
        "",
        "| step | status | wall time |",
        "|---|---|---:|",
    ]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} s |" for s in result.steps]
    lines.append("")
    for step in result.steps:
        figures = step.figures or {}
        if figures.get("comparisons") or figures.get("figures"):
            lines += [f"## {step.name}", "", f"{figures.get('setting', '')}", "", *figure_tables(figures)]
        if figures.get("runs"):  # the study's results.json
            lines += [f"## {step.name}", "", study_table(RunScores(figures["runs"], figures["settings"])), ""]
    for step in result.steps:
        if step.status != "passed":
            lines += [f"## {step.name}: {step.status}", "", "```", step.tail, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


README_FIGURES = "docs/gpu.json"


def readme_markdown(result: CheckResult) -> str:
    """The README's GPU section: the report, its title a sentence and its sections one level down."""
    body = report_markdown(result).split("\n", 2)[2]  # after the title line and the blank line
    lines = [f"Measured by `make gpu-check` on one {result.device} ({README_FIGURES}).", ""]
    for line in body.splitlines():
        lines.append("#### " + line[3:] if line.startswith("## ") else line)
    return "\n".join(lines) + "\n"


def write_report(result: CheckResult, out: Path) -> tuple[Path, Path]:
    """``gpu.md`` and ``gpu.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, figures = out / "gpu.md", out / "gpu.json"
    markdown.write_text(report_markdown(result))
    figures.write_text(json.dumps(asdict(result) | {"passed": result.passed}, indent=1))
    return markdown, figures


def device_name(device: str) -> str:
    """A readable name of ``device`` (the GPU's model for ``cuda``, else the device type)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return kind


def time_recipe(recipe: str, device: str, json_path: str) -> None:
    """Train ``recipe`` a few updates through ``masklab.recipes.train``, then time its step and its stages.

    The recipe run checks the real code path on the device (DatasetLoader on the built-in shapes). The step
    (forward, backward, optimizer) and the loader's stage chain (views, normalisation, mask) are then timed
    apart on one batch already on the device, so the figures do not include rendering the shapes.
    """
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _timing import Figures, median_ms

    from masklab.pipeline import Batch
    from masklab.recipes.build import patch_size_of
    from masklab.recipes.config import load_config
    from masklab.recipes.train import train
    from masklab.transforms import RefreshesCache, patch_grid

    on_cpu = torch.device(device).type == "cpu"
    size = 32 if on_cpu else 224
    sized = CPU_RECIPES[recipe] if on_cpu else GPU_RECIPES[recipe]
    overrides = [o for o in sized if not o.startswith("data.batch_size")]
    batch_size = 16 if on_cpu else int(next(o for o in sized if o.startswith("data.batch_size")).split("=")[1])
    precision = "no" if on_cpu else "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            recipe,
            [
                *overrides,
                f"data.batch_size={batch_size}",
                f"data.resolution={size}",
                f"data.length={2 * batch_size}",
                "run.epochs=100",
                "run.max_steps=3",
                "run.progress=false",
                "run.log_every=1",
                "eval.at_end=false",
                f"run.device={device}",
                f"optim.mixed_precision={precision}",
                f"run.out={tmp}",
            ],
        )
        result = train(cfg)
    model, chain = result.model.train(), result.stages
    dev = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    counter = iter(range(10**9))

    whole = {  # uncropped, unflipped: what AMT's cached maps are aligned by
        "crops": torch.tensor([[0.0, 0.0, size, size]], device=dev).expand(batch_size, 4),
        "flips": torch.zeros(batch_size, dtype=torch.bool, device=dev),
        "source_sizes": torch.full((batch_size, 2), size, device=dev),
    }

    def staged() -> Batch:
        images = torch.rand(batch_size, 3, size, size, device=dev)
        index = torch.arange(batch_size, device=dev)
        return chain(Batch(images=images, index=index, seed=next(counter), **whole))

    # AMT masks at random and throws nothing until its first refresh (a tenth into a run): time it after one,
    # masking and throwing, as it trains for the rest of the run.
    refreshed = [stage for stage in chain.stages if isinstance(stage, RefreshesCache)]
    grid = patch_grid(size, size, patch_size_of(cfg, model.backbone.family))  # the loop's refresh grid
    for stage in refreshed:
        images = torch.rand(batch_size, 3, size, size, device=dev)
        stage.refresh([Batch(images=images, index=torch.arange(batch_size, device=dev))], grid)
    batch = staged()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not on_cpu):
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
        for teacher, student in getattr(model, "teachers", list)():
            teacher.update(student, progress=0.5)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    step_ms = median_ms(step, 5)
    stage_ms = median_ms(staged, 5)
    precision_name = "fp32" if on_cpu else "bf16"
    figures = Figures(f"train {recipe}", f"{cfg.model.backbone}, B={batch_size}, {size} px, {precision_name}, {dev}")
    figures.figure("training step (forward, backward, optimizer)", step_ms, "ms")
    figures.figure("images per second (step alone)", 1000 * batch_size / step_ms, "img/s")
    figures.figure(
        "loader stages (views, normalise, mask): share of step + stages", 100 * stage_ms / (step_ms + stage_ms), "%"
    )
    if dev.type == "cuda":
        figures.figure("peak GPU memory (max_memory_allocated)", torch.cuda.max_memory_allocated(dev) / 2**30, "GiB")
    figures.figure("recipe updates run on the device", result.updates, "updates")
    if refreshed:
        figures.figure("tokens thrown a sample (after the first refresh)", batch.mask.counts[2], "tokens")
    figures.save(json_path)
    print(f"{recipe}: {step_ms:.1f} ms/step, {1000 * batch_size / step_ms:.0f} img/s, stages {stage_ms:.1f} ms")


def plan(device: str, quick: bool) -> list[tuple[str, list[str], float, str | None]]:
    """The steps: (name, command, timeout in seconds, JSON name or None)."""
    python = sys.executable
    on_cpu = device == "cpu"
    tests = [
        python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "device and not slow" if on_cpu else "device",
    ]
    steps: list[tuple[str, list[str], float, str | None]] = [
        # On an H100: 244 tests in 109 s (2026-11-27), 253 in 80 s (docs/gpu.md, 2026-11-28).
        ("device-aware tests", tests, 180 if on_cpu else 200, None)
    ]
    bench = {
        "masks": ["--quick", "--batch-size", "32"] if on_cpu else [],
        "throwing": ["--quick", "--batch-size", "4"] if on_cpu else ["--batch-size", "256"],
        # On a GPU the per-image contender launches ~195 merges' kernels an image: 7 repeats ran past 55 s.
        "hierarchy": ["--quick", "--batch-size", "16", "--step-batch-size", "4"]
        if on_cpu
        else ["--quick", "--step-batch-size", "256"],
        "maskdeep_groups": ["--quick", "--batch-size", "4", "--size", "32"]
        if on_cpu
        else ["--batch-size", "256", "--size", "224"],
    }
    for name, extra in bench.items():
        command = [python, f"benchmarks/{name}.py", "--device", device, *extra, "--json", f"{{tmp}}/{name}.json"]
        steps.append(
            (f"benchmark {name}", command, 300 if on_cpu else 120 if name == "hierarchy" else 55, f"{name}.json")
        )
    for recipe in GPU_RECIPES:
        command = [
            python,
            "tools/gpu_check.py",
            "--time-recipe",
            recipe,
            "--device",
            device,
            "--json",
            f"{{tmp}}/train_{recipe}.json",
        ]
        # A process's start, timm and three recipe updates before the timing: 30-35 s on an H100, so 35 was short.
        steps.append((f"train {recipe}", command, 300 if on_cpu else 75, f"train_{recipe}.json"))
    study = [python, "-m", "masklab.recipes.cli", "study", "--preset", "gpu", "--out", "{tmp}/study"]
    if on_cpu:  # the preset's path (built-in source, loader workers, fine-tuning) on 512 images, two arms
        study += ["--quick", "--recipes", "mae", "moco"]
    else:  # what fits a lease after the other steps: on an H200 each row took about 90 s
        # (docs/gpu-h200-2026-11-27.md), the whole preset (every arm) some 40 minutes; MAE and MAE-AMT, whose CPU
        # study left AMT under the bar
        study += ["--recipes", *GPU_STUDY_ARMS]
    steps.append(("study (gpu preset)", study, 300 if on_cpu else 420, "study/results.json"))
    return steps


def main(argv: list[str] | None = None) -> int:
    """Run the GPU check's command line; returns the exit status (non-zero if a step failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for the local run with tiny sizes")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check", help="report folder ($OUT if set)")
    parser.add_argument("--only", nargs="*", default=None, help="run only the steps whose names contain these")
    parser.add_argument("--skip", nargs="*", default=None, help="leave out the steps whose names contain these")
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds for the whole check: each step's timeout is cut to what is left (a device lease's minutes)",
    )
    parser.add_argument(
        "--readme",
        default=None,
        help=f"write this README's gpu section from a saved check (--report, default {README_FIGURES}); runs nothing",
    )
    parser.add_argument("--report", default=README_FIGURES, help="the gpu.json that --readme reads")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="GPU_JSON",
        help="write one report to --out from the gpu.json of calls that split a check (in order); runs nothing",
    )
    parser.add_argument("--time-recipe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_recipe:
        time_recipe(args.time_recipe, args.device, args.json)
        return 0
    if args.merge:
        try:
            merged = CheckResult.merge([CheckResult.load(Path(path)) for path in args.merge])
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--merge: {error}")
        markdown, _ = write_report(merged, Path(args.out))
        print(f"report: {markdown} ({'passed' if merged.passed else 'FAILED'}), from {len(args.merge)} checks")
        return 0
    if args.readme:
        from masklab.tools.readme import update_readme

        update_readme(Path(args.readme), "gpu", readme_markdown(CheckResult.load(ROOT / args.report)))
        print(f"updated the gpu section of {args.readme} from {args.report}")
        return 0
    import torch

    result = CheckResult(device=device_name(args.device), torch=torch.__version__)
    env = os.environ | {"MASKLAB_TEST_DEVICE": args.device, "PYTHONUNBUFFERED": "1"}
    out = Path(args.out)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, command, timeout, json_name in plan(args.device, quick=args.device == "cpu"):
            if args.only and not any(word in name for word in args.only):
                continue
            if args.skip and any(word in name for word in args.skip):
                continue
            command = [part.replace("{tmp}", tmp) for part in command]
            json_path = Path(tmp) / json_name if json_name else None
            if args.deadline is not None:
                left = args.deadline - (time.perf_counter() - began)
                if left < 5:
                    result.steps.append(StepResult(name, command, "not run", 0.0, "no time left before --deadline"))
                    continue
                timeout = min(timeout, left)
            result.steps.append(run_step(name, command, timeout, json_path, env))
            write_report(result, out)  # after every step, so a killed check leaves what it measured
    markdown, _ = write_report(result, out)
    print(f"report: {markdown} ({'passed' if result.passed else 'FAILED'})")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
