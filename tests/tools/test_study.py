import json

import pytest

from masklab.recipes.demo import RunScores
from masklab.tools import study
from masklab.tools.study import STUDY_ARMS, Arm, run_study, study_table

pytestmark = pytest.mark.ffcv


def test_arms_are_the_issue_methods_each_against_a_baseline_of_its_family():
    names = [arm.name for arm in STUDY_ARMS]
    assert names == [
        "mae",
        "mae_amt",
        "simmim",
        "simmim_amt",
        "ehm",
        "moco",
        "mixmask_moco",
        "byol",
        "maskdeep",
        "supervised",
        "supervised_mixmask",
    ]
    by_name = {arm.name: arm for arm in STUDY_ARMS}
    for arm in STUDY_ARMS:
        if arm.baseline is not None:
            base = by_name[arm.baseline]
            assert base.baseline is None and base.family == arm.family, arm.name
            assert base.overrides[0] == arm.overrides[0], arm.name  # the same backbone
    # With and without MixMask differ in MixMask only.
    with_mix, without = set(by_name["supervised_mixmask"].overrides), set(by_name["supervised"].overrides)
    assert with_mix ^ without == {"objective.mixmask=true", "objective.mixmask=false"}


def test_the_simmim_amt_arm_has_simmims_cells_and_the_authors_refresh_schedule():
    from masklab.recipes.config import load_config

    by_name = {arm.name: arm for arm in STUDY_ARMS}
    amt, simmim = (load_config(by_name[n].recipe, list(by_name[n].overrides)) for n in ("simmim_amt", "simmim"))
    assert amt.mask.mask_patch_size == simmim.mask.mask_patch_size == 8
    assert (amt.mask.ratio, amt.mask.throw_ratio, amt.mask.warmup_ratio) == (0.44, 0.26, 0.44)
    assert (amt.mask.refresh_start, amt.mask.refresh_every) == (0.2, 0.2)  # SimMIM-AMT: every 40 of 200 epochs from 40
    mae_amt = load_config(by_name["mae_amt"].recipe, list(by_name["mae_amt"].overrides)).mask
    assert (mae_amt.mask_patch_size, mae_amt.warmup_ratio, mae_amt.refresh_start, mae_amt.refresh_every) == (
        None,
        0.75,
        0.1,
        0.1,
    )


def test_table_means_spreads_and_differences_by_hand():
    result = RunScores(
        runs={
            "mae": {"0": {"knn": 0.1, "linear": 0.2, "updates": 4}, "1": {"knn": 0.3, "linear": 0.4, "updates": 4}},
            "ehm": {"0": {"knn": 0.5, "linear": 0.1, "updates": 4}, "1": {"knn": 0.5, "linear": 0.3, "updates": 4}},
        }
    )
    text = study_table(result, [Arm("mae", "mae"), Arm("ehm", "ehm", "mae")])
    lines = text.splitlines()
    # std of (0.1, 0.3) is 0.1414 (n - 1); ehm's kNN mean 0.5 is 0.3 above mae's 0.2; linear 0.2 is 0.1 below 0.3.
    assert lines[2] == "| mae |  | 4 | 0.200 ± 0.141 |  | 0.300 ± 0.141 |  | 2 |"
    assert lines[3] == "| ehm | mae | 4 | 0.500 ± 0.000 | +0.300 | 0.200 ± 0.141 | -0.100 | 2 |"


def test_bad_arm_and_epochs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config 'nope': not a file, nor one of the recipes"):
        run_study(["nope"], out=tmp_path)
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):
        run_study(["mae"], out=tmp_path, epochs=0)


def test_done_runs_are_kept_and_changed_settings_rerun(tmp_path, monkeypatch):
    calls = []

    def fake(arm, family, seed, common, run_out, loaders):
        calls.append(arm.name if arm else f"random_{family}")
        return {"knn": 0.5, "linear": 0.25, "updates": 0 if arm is None else 4}

    monkeypatch.setattr(study, "_run_one", fake)
    run_study(["mae", "moco"], out=tmp_path, quick=True, log=lambda *_: None)
    assert calls == ["random_cnn", "random_vit", "mae", "moco"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["moco"]["0"]["knn"] == 0.5 and saved["settings"]["epochs"] == 1
    run_study(["mae", "moco"], out=tmp_path, quick=True, log=lambda *_: None)
    assert len(calls) == 4  # nothing rerun
    run_study(["mae"], out=tmp_path, quick=True, overrides=["optim.lr=1e-3"], log=lambda *_: None)
    assert calls[4:] == ["random_vit", "mae"]  # other settings: a new study
    assert (tmp_path / "results.png").stat().st_size > 1000


@pytest.mark.slow
def test_quick_study_trains_every_arm_for_the_same_updates(tmp_path):
    result = run_study(out=tmp_path, quick=True, log=lambda *_: None)
    assert list(result.runs) == ["random_cnn", "random_vit", *[arm.name for arm in STUDY_ARMS]]
    for name, runs in result.runs.items():
        (run,) = runs.values()
        assert run["updates"] == (0 if name.startswith("random_") else 4), name  # 512 images, batch 128, one epoch
        assert 0.0 <= run["knn"] <= 1.0 and 0.0 <= run["linear"] <= 1.0
    table = (tmp_path / "results.md").read_text()
    assert len(table.splitlines()) == 2 + 2 + len(STUDY_ARMS)
    assert "| mae_amt | mae | 4 |" in table and "| supervised_mixmask | supervised | 4 |" in table
    assert (tmp_path / "results.png").stat().st_size > 1000
