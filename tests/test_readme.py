"""The README's examples run as written."""

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


def _section(tag: str) -> str:
    from masklab.recipes.readme import readme_section

    return readme_section(README, tag)


def test_readme_performance_section_is_the_bench_report_of_its_figures():
    from masklab.recipes.bench import README_CHART, README_FIGURES, BenchReport, report_markdown

    report = BenchReport.load(README.parent / README_FIGURES)
    assert not report.failed and not report.quick
    assert {r["benchmark"] for r in report.results} == {"hierarchy", "loader", "maskdeep_groups", "masks", "throwing"}
    assert _section("bench") == report_markdown(report, README_CHART)
    assert (README.parent / README_CHART).is_file()


def test_readme_study_section_is_the_study_of_its_figures():
    from masklab.recipes.study import README_FIGURES, README_PLOT, STUDY_ARMS, StudyResult, study_markdown

    result = StudyResult.load(README.parent / README_FIGURES)
    assert set(result.runs) == {"random_cnn", "random_vit", *(arm.name for arm in STUDY_ARMS)}
    assert all(len(runs) == 3 for runs in result.runs.values())  # three seeds each
    assert _section("study") == study_markdown(result, plot=README_PLOT)
    assert (README.parent / README_PLOT).is_file()
