import json
import subprocess
import sys

import pytest

from masklab.tools.gpu_check import (
    GPU_RECIPES,
    CheckResult,
    StepResult,
    plan,
    report_markdown,
    run_step,
    write_report,
)


def fake_result():
    figures = {
        "benchmark": "masks",
        "setting": "B=256, 224 px, cuda:0",
        "comparisons": [{"name": "RandomMask", "ours": 0.5, "reference": 50.0, "unit": "ms", "ratio": 100.0}],
        "figures": [{"name": "RandomMask: share of a ViT-B/16 bf16 step", "value": 0.25, "unit": "%"}],
    }
    return CheckResult(
        device="NVIDIA H100 80GB HBM3",
        torch="2.11.0",
        date="2026-11-26T12:00:00",
        steps=[
            StepResult("benchmark masks", ["python", "benchmarks/masks.py"], "passed", 12.4, figures=figures),
            StepResult("train moco", ["python", "tools/gpu_check.py"], "timed out", 60.2, tail="ran past 60 s"),
        ],
    )


def test_report_names_the_device_every_step_and_the_figures(tmp_path):
    result = fake_result()
    assert not result.passed
    markdown, figures = write_report(result, tmp_path)
    text = markdown.read_text()
    assert text.startswith("# masklab gpu-check on NVIDIA H100 80GB HBM3\n")
    assert "torch 2.11.0, 1.2 min in all: SOME STEPS FAILED." in text
    assert "| benchmark masks | passed | 12 s |" in text and "| train moco | timed out | 60 s |" in text
    assert "| RandomMask | 0.5 | 50 | ms | 100.00x |" in text
    assert "| RandomMask: share of a ViT-B/16 bf16 step | 0.25 | % |" in text
    assert "## train moco: timed out\n\n```\nran past 60 s\n```" in text
    saved = json.loads(figures.read_text())
    assert saved["device"] == "NVIDIA H100 80GB HBM3" and saved["passed"] is False
    assert [(s["name"], s["status"]) for s in saved["steps"]] == [
        ("benchmark masks", "passed"),
        ("train moco", "timed out"),
    ]
    assert report_markdown(CheckResult("cpu", "2.14", steps=fake_result().steps[:1])).count("all steps passed") == 1


def test_merge_joins_the_calls_of_a_split_check_in_order_a_rerun_step_in_its_place(tmp_path):
    from masklab.tools.gpu_check import main

    first, second = fake_result(), fake_result()
    second.date = "2026-11-26T12:10:00"
    second.steps = [
        StepResult("train moco", ["python"], "passed", 40.0),  # the step that timed out, rerun
        StepResult("study (gpu preset)", ["python"], "passed", 300.0),
    ]
    for folder, result in (("a", first), ("b", second)):
        write_report(result, tmp_path / folder)
    paths = [str(tmp_path / folder / "gpu.json") for folder in ("a", "b")]
    assert main(["--merge", *paths, "--out", str(tmp_path / "merged")]) == 0
    merged = CheckResult.load(tmp_path / "merged" / "gpu.json")
    assert [(s.name, s.status) for s in merged.steps] == [
        ("benchmark masks", "passed"),
        ("train moco", "passed"),
        ("study (gpu preset)", "passed"),
    ]
    assert merged.passed and merged.date == "2026-11-26T12:10:00" and merged.device == first.device
    assert merged.steps[0].figures == first.steps[0].figures
    other = fake_result()
    other.device = "NVIDIA H200"
    with pytest.raises(ValueError, match="different devices.*NVIDIA H200"):
        CheckResult.merge([first, other])


def test_run_step_reports_failure_timeout_and_a_missing_json(tmp_path):
    quiet = {"log": lambda *_: None}
    ok = run_step("ok", [sys.executable, "-c", "print('hi')"], 30, **quiet)
    assert ok.status == "passed" and ok.tail == "" and ok.seconds >= 0
    failed = run_step("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30, **quiet)
    assert failed.status == "failed" and "boom" in failed.tail
    slow = run_step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 0.5, **quiet)
    assert slow.status == "timed out" and "ran past 0 s" in slow.tail and slow.seconds < 10
    target = tmp_path / "figures.json"
    missing = run_step("no json", [sys.executable, "-c", "pass"], 30, target, **quiet)
    assert missing.status == "failed" and "wrote no figures.json" in missing.tail
    target.write_text('{"benchmark": "x"}')
    wrote = run_step("json", [sys.executable, "-c", "pass"], 30, target, **quiet)
    assert wrote.status == "passed" and wrote.figures == {"benchmark": "x"}
    # A step stopped at its timeout keeps the figures it saved as it went (the study's results.json).
    partial = run_step("partial", [sys.executable, "-c", "import time; time.sleep(30)"], 0.5, target, **quiet)
    assert partial.status == "timed out" and partial.figures == {"benchmark": "x"}


def test_deadline_cuts_the_steps_timeouts_and_leaves_out_what_does_not_fit(tmp_path, monkeypatch):
    from masklab.tools import gpu_check

    steps = [
        ("first", [sys.executable, "-c", "import time; time.sleep(30)"], 300, None),
        ("second", [sys.executable, "-c", "pass"], 300, None),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda device, quick: steps)
    monkeypatch.setattr(gpu_check, "device_name", lambda device: "cpu")
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--deadline", "6"])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert code == 1
    assert [(s["name"], s["status"]) for s in saved["steps"]] == [("first", "timed out"), ("second", "not run")]
    assert saved["steps"][0]["seconds"] < 10 and "before --deadline" in saved["steps"][1]["tail"]


def test_the_plan_runs_every_benchmark_and_recipe_on_the_device():
    gpu, cpu = plan("cuda", quick=False), plan("cpu", quick=True)
    names = [name for name, *_ in gpu]
    assert names[0] == "device-aware tests" and names == [name for name, *_ in cpu]
    assert {n for n in names if n.startswith("benchmark")} == {
        f"benchmark {b}" for b in ("masks", "throwing", "hierarchy", "maskdeep_groups")
    }
    assert {n for n in names if n.startswith("train")} == {
        f"train {r}" for r in ("mae", "mae_amt", "ehm", "moco", "mixmask_moco", "maskdeep")
    }
    assert all(command[command.index("--device") + 1] == "cuda" for _, command, *_ in gpu[1:-1])
    assert gpu[0][1][-1] == "device" and cpu[0][1][-1] == "device and not slow"
    assert names[-1] == "study (gpu preset)" and gpu[-1][1][-7:] == [
        *("--preset", "gpu", "--out", "{tmp}/study"),
        *("--recipes", "mae", "mae_amt"),
    ]
    assert cpu[-1][1][-5:] == ["{tmp}/study", "--quick", "--recipes", "mae", "moco"]
    # Each step's cap lies above its time on an H100 (docs/gpu.md and earlier: tests 109 s, a recipe's timing 30-47 s,
    # the hierarchy benchmark past 55 s at 7 repeats, so --quick there); --deadline fits the check to a call.
    caps = {name: timeout for name, _, timeout, _ in gpu}
    assert caps["device-aware tests"] >= 1.5 * 109 and all(caps[f"train {r}"] >= 1.5 * 47 for r in GPU_RECIPES)
    assert "--quick" in gpu[names.index("benchmark hierarchy")][1] and caps["benchmark hierarchy"] > 55


def test_the_bootstrap_imports_masklab_from_a_folder_of_another_name(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    copy = tmp_path / "tree"
    copy.symlink_to(root)  # a checkout whose folder is not named masklab
    done = subprocess.run(
        ["bash", str(copy / "tools" / "gpu_check.sh"), "--help"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--device" in done.stdout


def test_the_amt_recipe_is_timed_masking_and_throwing_as_after_its_first_refresh(tmp_path):
    # Before its first refresh AMT masks at random and throws nothing; the timing is of the step it trains
    # with for the rest of the run: 32 px, 4 px patches (64 tokens): 29 masked (0.45), 10 visible, 25 thrown.
    from masklab.tools.gpu_check import time_recipe

    time_recipe("mae_amt", "cpu", str(tmp_path / "amt.json"))
    figures = {f["name"]: f["value"] for f in json.loads((tmp_path / "amt.json").read_text())["figures"]}
    assert figures["tokens thrown a sample (after the first refresh)"] == 25
    assert figures["recipe updates run on the device"] == 3
