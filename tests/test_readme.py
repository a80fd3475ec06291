"""The README's examples run as written."""

import functools
import itertools
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no example '{name}'"
    return match.group(1)


def test_readme_opens_with_the_two_commands():
    head = "\n".join(README.read_text().splitlines()[:40])
    assert "make demo" in head and "make test" in head


@pytest.mark.slow
def test_supervised_example_trains():
    scope: dict = {}
    exec(compile(example("supervised"), "README.md", "exec"), scope)
    assert scope["loss"].isfinite()
    assert scope["targets"].shape == (64, 8)


def test_readme_compatibility_table_is_the_declared_one():
    from masklab.objectives import compatibility_table

    text = README.read_text()
    shown = text.split("<!-- compatibility -->\n", 1)[1].split("\n<!-- /compatibility -->", 1)[0]
    assert shown == compatibility_table()


def test_objective_example_runs():
    scope: dict = {}
    exec(compile(example("objective"), "README.md", "exec"), scope)
    assert scope["out"].loss.isfinite()


def test_ehm_example_masks_exact_counts_of_regions():
    scope: dict = {}
    exec(compile(example("ehm"), "README.md", "exec"), scope)
    assert scope["counts"] == (16, 48, 0)
    assert scope["regions"].shape == (8, 8, 8)
    assert all(r.unique().numel() == scope["stage"].num_regions(64) for r in scope["regions"])


def test_maskdeep_example_runs():
    scope: dict = {}
    exec(compile(example("maskdeep"), "README.md", "exec"), scope)
    assert scope["out"].loss.isfinite()
    assert any(p.grad is not None for p in scope["model"].backbone.parameters())


@pytest.mark.slow
def test_mixmask_example_trains():
    scope: dict = {}
    exec(compile(example("mixmask"), "README.md", "exec"), scope)
    assert scope["out"].loss.isfinite() and set(scope["out"].logs) == {"loss", "plain", "mixed"}
    assert int(scope["model"].queue.ptr) == 64


def test_export_example_loads_the_encoder_in_timm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example("export"), "README.md", "exec"), scope)
    assert tuple(scope["features"].shape) == (2, 32)
    assert (tmp_path / "runs" / "readme_export" / "encoder" / "config.json").is_file()


def _section(tag: str) -> str:
    from masklab.tools.readme import readme_section

    return readme_section(README, tag)


def test_readme_performance_section_is_the_bench_report_of_its_figures():
    from masklab.tools.bench import README_CHART, README_FIGURES, BenchReport, report_markdown

    report = BenchReport.load(README.parent / README_FIGURES)
    assert not report.failed and not report.quick
    assert {r["benchmark"] for r in report.results} == {
        "hierarchy",
        "loader",
        "maskdeep_groups",
        "masks",
        "memory",
        "throwing",
    }
    assert _section("bench") == report_markdown(report, README_CHART)
    assert (README.parent / README_CHART).is_file()


def test_readme_gpu_section_is_the_gpu_check_report_of_its_figures():
    from masklab.tools.gpu_check import README_FIGURES, CheckResult, readme_markdown

    result = CheckResult.load(README.parent / README_FIGURES)
    assert result.device.startswith("NVIDIA") and any(step.figures for step in result.steps)
    assert _section("gpu") == readme_markdown(result)
    # What the prose above the section reads from it.
    steps = {step.name: step for step in result.steps}
    assert all(step.status == "passed" for step in result.steps) and "study (gpu preset)" not in steps
    assert all(c["ratio"] > 1 for c in steps["benchmark masks"].figures["comparisons"])  # every stage is faster

    def figure(step: str, name: str) -> float:
        return next(f["value"] for f in steps[step].figures["figures"] if f["name"].startswith(name))

    assert figure("train mae_amt", "training step") < figure("train mae", "training step")
    assert figure("train ehm", "loader stages") > 50  # EHM's stage costs more than the ViT-B step it feeds
    stage, tree = figure("benchmark hierarchy", "EHM stage"), figure("benchmark hierarchy", "EHM tree build")
    assert tree > stage / 2  # and most of it is the region trees
    assert min(figure(f"train {r}", "loader stages") for r in ("moco", "mixmask_moco", "maskdeep")) > 10


def test_readme_study_section_is_the_study_of_its_figures():
    from masklab.recipes.demo import RunScores
    from masklab.tools import study

    result = RunScores.load(README.parent / study.README_FIGURES)
    curves = RunScores.load(README.parent / study.README_CURVE_FIGURES)
    assert all(set(runs) <= {"0", "1", "2"} for runs in result.runs.values())  # three seeds each, when done
    assert _section("study") == study.study_markdown(result, plot=study.README_PLOT, curves=curves)
    assert (README.parent / study.README_PLOT).is_file() and (README.parent / study.README_CURVES).is_file()
    # The budget curves are at the study's setting, for every baseline, each from random init on.
    assert curves.settings["length"] == study.STUDY_DATA["length"] and set(curves.runs) == set(study.CURVE_ARMS)
    assert all("0" in points and len(points) >= 3 for points in curves.runs.values())
    # What STUDY_EPOCHS rests on (its docstring, the README's prose): at the study's budget every baseline's
    # curve is past its random init by the bar on both probes.
    budget = str(study.STUDY_EPOCHS * (study.STUDY_DATA["length"] // study.STUDY_BATCH))
    for name, points in curves.runs.items():
        for metric in ("knn", "linear"):
            assert points[budget][metric] - points["0"][metric] >= study.BAR, (name, metric)
    seeds = study.study_seeds(result)
    all_in = functools.partial(study.all_seeds_in, result)  # every seed of the study is in for this arm
    complete = all(len(result.runs.get(arm.name, {})) == 3 for arm in study.STUDY_ARMS)
    # A study in progress says so, naming the arms still to run (written from the figures, as the rest).
    assert ("A study in progress" in _section("study")) == (not complete)
    if complete:
        assert set(result.runs) == {"random_cnn", "random_vit", *(arm.name for arm in study.STUDY_ARMS)}
    # Every self-supervised arm whose seeds are in clears the bar, or the study says what it measured of why
    # it does not (study.BELOW_BAR, printed in the section); no such reading stays for an arm above the bar.
    below = study.below_bar(result)
    assert set(below) <= set(study.BELOW_BAR), "below the bar with no reading: " + ", ".join(below)
    done = [a for a in study.STUDY_ARMS if a.name in study.BELOW_BAR and all_in(a.name)]
    assert all(arm.name in below for arm in done), "a reading for an arm that clears the bar"
    if "mae_amt" in below:  # what its reading says: level with random init on the probe, below it fine-tuned
        assert "within the spread" in study.verdict(result, "mae_amt", "random_vit", "linear")
        assert ", below (spread" in study.verdict(result, "mae_amt", "random_vit", "finetune")
    if "mae_amt" in below and all_in("mae_random_throw"):  # once its control is in:
        # what its reading says, the control clears the bar and is above it beyond the spread
        assert study.bar_gain(result, study._arm_for("mae_random_throw")) >= study.BAR
        for metric in ("knn", "linear"):
            assert ", below (spread" in study.verdict(result, "mae_amt", "mae_random_throw", metric), metric
        if all_in("mae_amt_late"):  # and with a late first refresh: clears, level
            assert study.bar_gain(result, study._arm_for("mae_amt_late")) >= study.BAR
            for other in ("mae", "mae_random_throw"):
                assert "within the spread" in study.verdict(result, "mae_amt_late", other, "linear"), other
    if "mae_amt_equal_time" in below:  # what its reading says: level with mae_amt at equal updates on every
        for metric in ("knn", "linear", "finetune"):  # evaluation, below MAE beyond the spread on every one
            assert "within the spread" in study.verdict(result, "mae_amt_equal_time", "mae_amt", metric), metric
            assert ", below (spread" in study.verdict(result, "mae_amt_equal_time", "mae", metric), metric
        assert "within the spread" in study.verdict(result, "mae_amt_equal_time", "random_vit", "linear")
        placements = [run["placement"] for run in result.runs["mae_amt_equal_time"].values()]
        assert 0 < sum(p["visible"] > p["masked"] for p in placements) < len(placements)  # not the same way
    if "simmim_amt_equal_time" in below:  # level with simmim_amt and random init on every evaluation, below
        for metric in ("knn", "linear", "finetune"):  # SimMIM beyond the spread on the probe and fine-tuned
            for other in ("simmim_amt", "random_vit"):
                verdict = study.verdict(result, "simmim_amt_equal_time", other, metric)
                assert "within the spread" in verdict, (other, metric)
        for metric in ("linear", "finetune"):
            assert ", below (spread" in study.verdict(result, "simmim_amt_equal_time", "simmim", metric), metric
        placements = [run["placement"] for run in result.runs["simmim_amt_equal_time"].values()]
        assert sum(p["visible"] > p["masked"] for p in placements) == 2  # the object left visible in two seeds
    for base, amt in (("mae", "mae_amt"), ("simmim", "simmim_amt")):  # the equal-time arms' reading: at this
        if all_in(amt):  # length AMT's whole runs, refreshes included, take about
            ratios = [result.runs[amt][s]["train_seconds"] / result.runs[base][s]["train_seconds"] for s in seeds]
            assert all(0.85 <= r <= 1.15 for r in ratios), (amt, ratios)  # as long as its baseline's
            steps = [
                result.runs[amt][s]["step_images_per_s"] / result.runs[base][s]["step_images_per_s"] for s in seeds
            ]
            assert all(r > 1.15 for r in steps), (amt, steps)  # while its steps alone are faster
    if "simmim_amt" in below:  # level with random init on the probe and fine-tuned; below SimMIM on every one
        for metric in ("linear", "finetune"):
            assert "within the spread" in study.verdict(result, "simmim_amt", "random_vit", metric), metric
        for metric in ("knn", "linear", "finetune"):
            assert ", below (spread" in study.verdict(result, "simmim_amt", "simmim", metric), metric
        placements = [run["placement"] for run in result.runs["simmim_amt"].values()]
        assert sum(p["visible"] > p["masked"] for p in placements) == 2  # the object left visible in two seeds
        for base, mask, on_object in (("simmim", "simmim_amt", False), ("mae", "mae_amt", True)):  # and from
            drawn = [run["placement_of"][mask] for run in result.runs[base].values()]  # the baselines' checkpoints
            assert all((p["masked"] > p["visible"]) == on_object for p in drawn), base
        # Its control clears the bar, level with SimMIM; simmim_amt is below the control on the linear probe.
        assert study.bar_gain(result, study._arm_for("simmim_random_throw")) >= study.BAR
        for metric in ("knn", "linear", "finetune"):
            assert "within the spread" in study.verdict(result, "simmim_random_throw", "simmim", metric), metric
        assert ", below (spread" in study.verdict(result, "simmim_amt", "simmim_random_throw", "linear")
        if all_in("simmim_amt_late"):  # late refresh: clears, level; still misplaced
            assert study.bar_gain(result, study._arm_for("simmim_amt_late")) >= study.BAR
            for other, metric in itertools.product(("simmim", "simmim_random_throw"), ("knn", "linear", "finetune")):
                assert "within the spread" in study.verdict(result, "simmim_amt_late", other, metric), (other, metric)
            late = result.runs["simmim_amt_late"].values()
            assert all(run["placement"]["visible"] > run["placement"]["masked"] for run in late)


def test_readme_demo_section_is_the_demo_of_its_figures():
    from masklab.recipes.demo import README_FIGURES, RunScores, demo_markdown

    result = RunScores.load(README.parent / README_FIGURES)
    assert set(result.runs) == {"mae", "random_vit"}
    assert set(result.runs["mae"]) == set(result.runs["random_vit"]) == {"0", "1", "2"}
    assert _section("demo") == demo_markdown(result)
    for seed, run in result.runs["mae"].items():  # the demo's promise: pretraining shows, for every seed
        assert run["linear"] - result.runs["random_vit"][seed]["linear"] >= 0.08, seed
        assert run["seconds"] < 10 * 60, seed


# Measurement-like figures: ratios (3.1x), percentages, durations, throughput, 3-decimal accuracies, spreads.
FIGURE = re.compile(
    r"\d+(?:\.\d+)?\s?(?:x\b|%|ms\b|min\b|minutes|hours|seconds|images/s|img/s)|\d+(?:\.\d+)? s\b|\b0\.\d{3}\b|±"
)
NOT_MEASURED = {
    "0.999": "MoCo's momentum, a setting",
    "0.996": "BYOL's starting EMA in the paper, a setting",
    "10%": "AMT's refresh start and period, settings",
    "20%": "SimMIM-AMT's refresh start and period, settings",
    "12.5%": "chance with 8 classes",
}


def test_every_readme_figure_is_generated_from_saved_results():
    """Outside the generated sections (demo, study, bench, gpu) and code blocks, the README states no measured
    figure."""
    text = README.read_text()
    generated = re.findall(r"<!-- (\w+):start -->", text)
    assert sorted(generated) == ["bench", "demo", "gpu", "study"]
    prose = re.sub(r"<!-- (\w+):start -->.*?<!-- \1:end -->", "", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)
    typed = [
        (m.group(0), line.strip())
        for line in prose.splitlines()
        for m in FIGURE.finditer(line)
        if m.group(0).strip() not in NOT_MEASURED
    ]
    assert not typed, f"figures typed by hand in the README (generate them from saved results): {typed}"
