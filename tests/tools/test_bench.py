import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from masklab.recipes.cli import main
from masklab.tools.bench import (
    BenchReport,
    find_benchmarks,
    report_markdown,
    run_bench,
    write_report,
)
from masklab.tools.readme import update_readme

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

FAST = """
import argparse
from _timing import Figures, add_json_argument
parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
add_json_argument(parser)
args = parser.parse_args()
figures = Figures("fast", "quick" if args.quick else "full")
figures.compare("stage vs per sample", 2.0, "per sample", 10.0, "ms")
figures.compare("loader vs DataLoader", 300.0, "DataLoader", 100.0, "img/s", higher_is_better=True)
figures.figure("share of a step", 1.5, "%")
print("fast ran")
figures.save(args.json)
"""


@pytest.fixture
def fake_benchmarks(tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    shutil.copy(BENCHMARKS / "_timing.py", folder / "_timing.py")
    (folder / "fast.py").write_text(FAST)
    (folder / "broken.py").write_text("raise RuntimeError('out of cheese')\n")
    return folder


def test_run_bench_gathers_figures_and_records_failures(fake_benchmarks):
    report = run_bench(fake_benchmarks, quick=True, log=lambda *_: None)
    assert [r["benchmark"] for r in report.results] == ["fast"]
    fast = report.results[0]
    assert fast["setting"] == "quick"
    assert [c["ratio"] for c in fast["comparisons"]] == [5.0, 3.0]  # reference/ours for ms, ours/reference for img/s
    assert fast["figures"] == [{"name": "share of a step", "value": 1.5, "unit": "%"}]
    assert list(report.failed) == ["broken"]
    assert "RuntimeError: out of cheese" in report.failed["broken"]
    assert set(report.seconds) == {"broken", "fast"}

    text = report_markdown(report)
    assert "| stage vs per sample | 2 | 10 | ms | 5.00x |" in text
    assert "| loader vs DataLoader | 300 | 100 | img/s | 3.00x |" in text
    assert "| share of a step | 1.5 | % |" in text
    assert "**broken: failed**" in text
    assert "masklab bench --quick" in text and "cores" in text


def test_write_report_and_readme_section(fake_benchmarks, tmp_path):
    report = run_bench(fake_benchmarks, only=["fast"], log=lambda *_: None)
    assert report.results[0]["setting"] == "full"
    markdown, chart = write_report(report, tmp_path / "out")
    assert chart is not None and chart.stat().st_size > 1000
    assert "![benchmark ratios](bench.png)" in markdown.read_text()

    saved = BenchReport.load(tmp_path / "out" / "bench.json")
    assert saved == report

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\n## Next\n")
    update_readme(readme, "bench", report_markdown(report, "docs/bench.png"), {chart: "docs/bench.png"})
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n\n## Performance\n") and text.endswith("\n\n## Next\n")
    assert "![benchmark ratios](docs/bench.png)" in text
    assert (tmp_path / "docs" / "bench.png").read_bytes() == chart.read_bytes()

    bare = tmp_path / "BARE.md"
    bare.write_text("# no section\n")
    with pytest.raises(ValueError, match="no <!-- bench:start --> ... <!-- bench:end --> section"):
        update_readme(bare, "bench", "x")


def test_unknown_benchmark_and_missing_folder_are_clear_errors(fake_benchmarks, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['nope'\]; the scripts are \['broken', 'fast'\]"):
        run_bench(fake_benchmarks, only=["nope"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no benchmark scripts in .*empty: masklab bench runs the benchmarks/"):
        find_benchmarks(empty)
    assert main(["bench", "--dir", str(empty)]) == 2
    assert "no benchmark scripts" in capsys.readouterr().err


def test_cli_bench_exit_status_says_a_script_failed(fake_benchmarks, tmp_path, capsys):
    assert main(["bench", "--dir", str(fake_benchmarks), "--out", str(tmp_path / "r"), "--quick"]) == 1
    captured = capsys.readouterr()
    assert "failed: broken" in captured.err
    assert (tmp_path / "r" / "bench.md").exists()


def test_the_source_checkout_benchmarks_are_found_and_take_json():
    folder = find_benchmarks()
    assert folder == BENCHMARKS
    names = [p.stem for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")]
    assert names == ["hierarchy", "loader", "maskdeep_groups", "masks", "memory", "throwing"]
    # Each script's own `--help`, all in one process (a process a script paid torch's and timm's imports six times).
    each_help = (
        "import contextlib, io, json, runpy, sys\n"
        "usages = {}\n"
        "for name in sys.argv[1:]:\n"
        "    sys.argv, out = [name + '.py', '--help'], io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        runpy.run_path(name + '.py', run_name='__main__')\n"
        "    usages[name] = out.getvalue()\n"
        "print(json.dumps(usages))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", each_help, *names], cwd=folder, capture_output=True, text=True, check=True
    )
    usages = json.loads(run.stdout.strip().splitlines()[-1])
    assert list(usages) == names
    for name, usage in usages.items():
        assert f"usage: {name}.py" in usage and "--json PATH" in usage and "--quick" in usage, name


@pytest.mark.slow
def test_real_mask_benchmark_reports_every_stage(tmp_path):
    report = run_bench(BENCHMARKS, quick=True, only=["masks"], log=lambda *_: None)
    assert not report.failed
    (masks,) = report.results
    stages = [
        "RandomMask 0.75",
        "SimMIMMask 0.6",
        "BlockMask 0.4",
        "MixMask 8x8",
        "FeatureMask G=4",
        "ColorNoise green",
        "MultiBlockMask",
        "HardPatchMask 0.75",
        "AttMask 0.75 hint",
    ]
    assert [c["name"].split(" vs ")[0] for c in masks["comparisons"]] == stages
    assert all(c["ratio"] > 0 for c in masks["comparisons"])
    shares = [f for f in masks["figures"] if f["unit"] == "%"]
    assert len(shares) == len(stages) + 1
