import json
from pathlib import Path

import pytest

from masklab.recipes.demo import RunScores
from masklab.tools import placement, study
from masklab.tools.study import STUDY_ARMS, Arm, run_study, study_table

pytestmark = pytest.mark.ffcv


def test_arms_are_the_issue_methods_each_against_a_baseline_of_its_family():
    names = [arm.name for arm in STUDY_ARMS]
    assert names == [
        "mae",
        "mae_amt",
        "mae_random_throw",
        "mae_amt_late",
        "simmim",
        "simmim_amt",
        "simmim_random_throw",
        "simmim_amt_late",
        "mae_amt_equal_time",
        "simmim_amt_equal_time",
        "ehm",
        "mae_colormae",
        "mae_attmask",
        "mae_multiblock",
        "mae_hpm",
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
    # AMT's control masks and throws as many cells as MAE-AMT, at random: the attention is the only difference.
    from masklab.recipes.config import load_config

    amt, control = (
        load_config(by_name[n].recipe, list(by_name[n].overrides)).mask for n in ("mae_amt", "mae_random_throw")
    )
    assert by_name["mae_amt"].control == "mae_random_throw" and control.name == "random"
    assert (control.ratio, control.throw_ratio) == (amt.ratio, amt.throw_ratio) == (0.45, 0.4)
    # The late-refresh diagnostic is MAE-AMT with its first refresh moved, nothing else.
    late, amt = (load_config(by_name[n].recipe, list(by_name[n].overrides)) for n in ("mae_amt_late", "mae_amt"))
    assert late.mask.refresh_start == 0.67 and amt.mask.refresh_start == 0.1
    late.mask.refresh_start = amt.mask.refresh_start
    assert late == amt and by_name["mae_amt_late"].control == "mae_random_throw"
    late, amt = (load_config(by_name[n].recipe, list(by_name[n].overrides)) for n in ("simmim_amt_late", "simmim_amt"))
    assert late.mask.refresh_start == 0.67 and amt.mask.refresh_start == 0.2
    late.mask.refresh_start = amt.mask.refresh_start
    assert late == amt and by_name["simmim_amt_late"].control == "simmim_random_throw"
    # SimMIM-AMT's likewise, on SimMIM's cells with its rounded-up counts (8 masked, 5 thrown of 16 at 32 px).
    amt, control = (
        load_config(by_name[n].recipe, list(by_name[n].overrides)).mask for n in ("simmim_amt", "simmim_random_throw")
    )
    assert by_name["simmim_amt"].control == "simmim_random_throw" and control.name == "simmim"
    assert (control.ratio, control.throw_ratio, control.mask_patch_size) == (amt.ratio, amt.throw_ratio, 8)
    assert (amt.ratio, amt.throw_ratio, amt.mask_patch_size) == (0.44, 0.26, 8)


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


def test_the_study_reads_its_vits_through_the_mean_of_the_normed_patch_tokens():
    # Evaluation, fine-tuning and the random-init row all take study.VIT: features are the patch tokens' mean
    # after the final norm (not the class token), and the weights are the class-token model's (no fc_norm).
    import timm
    import torch

    from masklab.recipes.build import build_model, encoder_of
    from masklab.recipes.config import load_config

    cfg = load_config("mae", [*study.VIT, "data.resolution=32"])
    torch.manual_seed(0)
    backbone = encoder_of(build_model(cfg).eval())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.model.forward_features(images)  # after the final norm
        features = backbone(images)
    assert torch.allclose(features, tokens[:, backbone.model.num_prefix_tokens :].mean(1), atol=1e-6)
    assert not torch.allclose(features, tokens[:, 0], atol=1e-3)
    plain = timm.create_model(cfg.model.backbone, img_size=32, patch_size=4, depth=4, num_classes=0)
    assert set(backbone.model.state_dict()) == set(plain.state_dict())


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
    assert lines[2] == "| mae |  | 4 |  | 0.200 ± 0.141 |  | 0.300 ± 0.141 |  | 2 |"
    assert lines[3] == "| ehm | mae | 4 |  | 0.500 ± 0.000 | +0.300 | 0.200 ± 0.141 | -0.100 | 2 |"


def test_table_has_fine_tuning_and_speed_where_runs_have_them():
    run = {"knn": 0.2, "linear": 0.3, "updates": 10, "images_per_s": 100.0}
    result = RunScores(
        runs={
            "random_vit": {"0": {"knn": 0.1, "linear": 0.2, "updates": 0, "finetune": 0.25}},
            "mae": {"0": {**run, "finetune": 0.5}, "1": {**run, "finetune": 0.7, "images_per_s": 200.0}},
            "moco": {"0": run},
        }
    )
    lines = study_table(result, [Arm("mae", "mae"), Arm("moco", "moco", family="cnn")]).splitlines()
    assert lines[0].endswith("| fine-tuned (mean ± std) | Δ fine-tuned | seeds |")
    assert lines[3] == "| mae |  | 10 | 150 | 0.200 ± 0.000 |  | 0.300 ± 0.000 |  | 0.600 ± 0.141 |  | 2 |"
    assert lines[4] == "| moco |  | 10 | 100 | 0.200 ± 0.000 |  | 0.300 ± 0.000 |  |  |  | 1 |"
    # A speed measured with other runs alongside (--jobs) is marked, and the text says why.
    arms = [Arm("mae", "mae"), Arm("moco", "moco", family="cnn")]
    assert "images/s marked *" not in study.study_markdown(result, arms, plot=None)
    result.runs["moco"]["0"]["at_once"] = 2
    assert study_table(result, arms).splitlines()[4].startswith("| moco |  | 10 | 100* |")
    assert "images/s marked *: runs trained several at once" in study.study_markdown(result, arms, plot=None)


def test_placement_table_by_hand_and_in_the_readme_text():
    placed = {"visible": 0.3, "masked": 0.1, "thrown": 0.2, "all": 0.2}
    result = RunScores(
        runs={
            "mae": {
                "0": {
                    "knn": 0.1,
                    "linear": 0.2,
                    "updates": 4,
                    "placement": {"visible": 0.2, "masked": 0.2},
                    "placement_of": {"mae_amt": placed},
                }
            },
            "mae_amt": {
                "0": {"knn": 0.1, "linear": 0.2, "updates": 4, "placement": placed},
                "1": {"knn": 0.1, "linear": 0.2, "updates": 4, "placement": {**placed, "masked": 0.3}},
            },
            "moco": {"0": {"knn": 0.1, "linear": 0.2, "updates": 4, "placement": None}},
        }
    )
    arms = [Arm("mae", "mae"), Arm("mae_amt", "mae_amt", "mae"), Arm("moco", "moco", family="cnn")]
    lines = study.placement_table(result, arms).splitlines()
    # mae_amt's masked shares 0.1 and 0.3: mean 0.2, std 0.141; mae recorded no thrown cells nor all.
    assert lines[2:] == [
        "| mae | 0.200 ± 0.000 |  | 0.200 |  | 1 |",
        "| mae_amt's mask from mae's checkpoints | 0.100 ± 0.000 | 0.200 | 0.300 | 0.200 | 1 |",
        "| mae_amt | 0.200 ± 0.141 | 0.200 | 0.300 | 0.200 | 2 |",
    ]
    assert "Where each arm's trained masks land" in study.study_markdown(result, arms, plot=None)
    for run in (*result.runs["mae"].values(), *result.runs["mae_amt"].values()):
        run.pop("placement")
        run.pop("placement_of", None)
    assert study.placement_table(result, arms) == ""  # recorded before placements were: no table
    assert "Where each arm's trained masks land" not in study.study_markdown(result, arms, plot=None)


def test_runs_get_their_placement_and_runs_recorded_before_get_it_on_resume(tmp_path, monkeypatch):
    calls, placed = [], []

    def fake(arm, family, seed, common, run_out, loaders):
        calls.append(arm.name if arm else f"random_{family}")
        return {"knn": 0.5, "linear": 0.25, "updates": 0 if arm is None else 4, "checkpoint": f"{run_out.name}/ck"}

    def fake_placement(checkpoint, background, mask_of=None):
        placed.append((str(checkpoint), mask_of))
        return {"masked": 0.5 if mask_of is None else 0.125, "all": 0.25}

    monkeypatch.setattr(study, "_run_one", fake)
    monkeypatch.setattr(study, "_finetune", lambda *args: 0.5)
    monkeypatch.setattr(placement, "mask_placement", fake_placement)
    run_study(["mae"], out=tmp_path, quick=True, log=lambda *_: None)
    # The arm's own masks, not the random-init row's; and, MAE being a baseline, AMT's drawn from its checkpoint.
    assert placed == [("mae-seed0/ck", None), ("mae-seed0/ck", "mae_amt")]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["mae"]["0"]["placement"] == {"masked": 0.5, "all": 0.25}
    assert saved["runs"]["mae"]["0"]["placement_of"] == {"mae_amt": {"masked": 0.125, "all": 0.25}}
    assert "placement" not in saved["runs"]["random_vit"]["0"] and "checkpoint" not in saved["runs"]["mae"]["0"]
    del saved["runs"]["mae"]["0"]["placement_of"]
    (tmp_path / "results.json").write_text(json.dumps(saved))
    monkeypatch.setattr(study, "_last_checkpoint", lambda run_out: f"{run_out.name}/last")
    run_study(["mae"], out=tmp_path, quick=True, log=lambda *_: None)
    assert calls == ["random_vit", "mae"]  # measured, not trained again
    assert placed[2:] == [("mae-seed0/last", None), ("mae-seed0/last", "mae_amt")]
    assert (
        json.loads((tmp_path / "results.json").read_text())["runs"]["mae"]["0"]["placement_of"]["mae_amt"]["masked"]
        == 0.125
    )


def test_reading_says_above_only_beyond_the_seed_spread_and_checks_the_bar():
    result = RunScores(
        runs={
            "random_vit": {s: {"knn": 0.1, "linear": 0.2, "finetune": 0.3} for s in "012"},
            "mae": {s: {"knn": 0.2, "linear": 0.30 + 0.01 * int(s), "finetune": 0.4} for s in "012"},
            "mae_amt": {s: {"knn": 0.2, "linear": 0.33 + 0.01 * int(s), "finetune": 0.41} for s in "012"},
        }
    )
    arms = [Arm("mae", "mae"), Arm("mae_amt", "mae_amt", "mae", claim="+3")]
    table = study.reading_table(result, arms).splitlines()
    # mae's linear 0.31 is 0.11 over random (0.2): clears the 0.05 bar; mae_amt is 0.03 above mae with
    # spreads of 0.01 each (sum 0.02): above. Fine-tuned: +0.01 with no spread: above.
    assert table[2] == "| mae | linear | +0.110 (clears +0.05) |  |  |"
    assert table[4] == "| mae_amt | linear | +0.140 (clears +0.05) | mae: +0.030, above (spread 0.020) | +3 |"
    assert table[5] == "| mae_amt | fine-tuned | +0.110 (clears +0.05) | mae: +0.010, above (spread 0.000) |  |"
    assert study.verdict(result, "mae", "mae_amt", "linear") == "-0.030, below (spread 0.020)"
    # An arm with a control is read against both: mae_amt's linear 0.34 against the control's 0.40 (no spread).
    result.runs["control"] = {s: {"knn": 0.2, "linear": 0.40, "finetune": 0.41} for s in "012"}
    arms[1] = Arm("mae_amt", "mae_amt", "mae", claim="+3", control="control")
    both = study.reading_table(result, arms).splitlines()[4]
    assert both.endswith("| mae: +0.030, above (spread 0.020); control: -0.060, below (spread 0.010) | +3 |")
    result.runs["mae_amt"] = {s: {"linear": 0.315 + 0.01 * int(s)} for s in "012"}
    assert study.verdict(result, "mae_amt", "mae", "linear") == "+0.015, within the spread (spread 0.020)"


def test_arms_below_the_bar_are_listed_with_the_studys_reading_of_why(monkeypatch):
    three = "012"
    result = RunScores(
        runs={
            "random_vit": {s: {"linear": 0.20} for s in three},
            "random_cnn": {s: {"knn": 0.20, "linear": 0.30} for s in three},
            "mae": {s: {"linear": 0.26} for s in three},  # +0.06: clears
            "mae_amt": {s: {"linear": 0.24} for s in three},  # +0.04: below
            "simmim": {s: {"linear": 0.21} for s in "01"},  # below, but a seed is still to run
            "moco": {s: {"knn": 0.26, "linear": 0.31} for s in three},  # kNN +0.06: clears on one evaluation
            "byol": {s: {"knn": 0.22, "linear": 0.32} for s in three},  # +0.02 at best: below, no reading yet
            "supervised": {s: {"knn": 0.20, "linear": 0.30} for s in three},  # supervised: not held to the bar
        }
    )
    for runs in result.runs.values():
        for run in runs.values():
            run["updates"] = 930
    arms = [study._arm_for(n) for n in ("mae", "mae_amt", "simmim", "moco", "byol", "supervised")]
    assert study.bar_gain(result, arms[0]) == pytest.approx(0.06) and study.bar_gain(result, arms[5]) is None
    assert study.below_bar(result, arms) == ["mae_amt", "byol"]
    monkeypatch.setattr(study, "BELOW_BAR", {"mae_amt": "measured reason."})
    text = study.study_markdown(result, arms, plot=None)
    assert "- **mae_amt**: measured reason.\n- **byol**: not looked into yet.\n" in text
    assert "- **simmim**" not in text and "- **supervised**" not in text
    # The batch it states is the one the runs trained at: the GPU preset's where the study set it.
    assert f"epochs at batch {study.STUDY_BATCH} for every arm" in text
    result.settings["common"] = ["data.batch_size=256", "run.epochs=6"]
    assert "epochs at batch 256 for every arm" in study.study_markdown(result, arms, plot=None)
    result.runs["byol"] = {s: {"knn": 0.30, "linear": 0.32} for s in three}
    assert study.below_bar(result, arms) == ["mae_amt"]


def test_a_run_recorded_before_masklab_gained_a_setting_at_its_default_is_kept(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from masklab.recipes.config import load_config, to_dict

    calls = []

    def fake(arm, family, seed, common, run_out, loaders):
        calls.append(arm.name if arm else f"random_{family}")
        if arm is None:
            return {"knn": 0.5, "linear": 0.25, "updates": 0}
        run_out.mkdir(parents=True, exist_ok=True)  # the run's config.yaml, as training writes it
        (run_out / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(load_config(arm.recipe, [*common]))))
        return {"knn": 0.5, "linear": 0.25, "updates": 4}

    monkeypatch.setattr(study, "_run_one", fake)
    monkeypatch.setattr(study, "_finetune", lambda *args: 0.5)
    monkeypatch.setattr(study, "_placements", lambda arm, checkpoint: {"placement": None})
    recipe = tmp_path / "my_simmim.yaml"
    recipe.write_text("task: pretrain\nobjective:\n  name: simmim\nmask:\n  name: simmim\n")
    run_study([str(recipe)], out=tmp_path, quick=True, log=lambda *_: None)
    # As if recorded before SimMIM's mask had throw_ratio: the fingerprint then, and a config.yaml without it.
    saved = json.loads((tmp_path / "results.json").read_text())
    saved["runs"][str(recipe)]["0"]["config"] = "0123456789abcdef"
    (tmp_path / "results.json").write_text(json.dumps(saved))
    config = tmp_path / f"{recipe}-seed0" / "config.yaml"
    old = OmegaConf.to_container(OmegaConf.load(config))
    del old["mask"]["throw_ratio"]
    config.write_text(OmegaConf.to_yaml(old))
    run_study([str(recipe)], out=tmp_path, quick=True, log=lambda *_: None)
    assert calls == ["random_vit", str(recipe)]  # kept, its fingerprint brought up to date
    assert json.loads((tmp_path / "results.json").read_text())["runs"][str(recipe)]["0"]["config"] != "0123456789abcdef"
    old["mask"]["ratio"] = 0.3  # a setting that differs: trained again
    config.write_text(OmegaConf.to_yaml(old))
    saved["runs"][str(recipe)]["0"]["config"] = "0123456789abcdef"
    (tmp_path / "results.json").write_text(json.dumps(saved))
    run_study([str(recipe)], out=tmp_path, quick=True, log=lambda *_: None)
    assert calls == ["random_vit", str(recipe), str(recipe)]


def test_equal_time_arm_runs_after_its_pair_for_the_updates_its_steps_buy(tmp_path, monkeypatch):
    seen = []

    def fake(arm, family, seed, common, run_out, loaders):
        name = arm.name if arm else f"random_{family}"
        seen.append((name, [c for c in common if c.startswith(("run.max_steps", "run.epochs"))]))
        seconds = {"mae": 100.0, "mae_amt": 50.0}.get(name, 0.0)
        return {"knn": 0.5, "linear": 0.25, "updates": 0 if arm is None else 4, "train_seconds": seconds}

    monkeypatch.setattr(study, "_run_one", fake)
    monkeypatch.setattr(study, "_finetune", lambda *args: 0.5)
    run_study(["mae_amt_equal_time", "mae", "mae_amt"], out=tmp_path, quick=True, log=lambda *_: None)
    assert [name for name, _ in seen] == ["random_vit", "mae", "mae_amt", "mae_amt_equal_time"]
    # mae trained 100 s; mae_amt 4 updates in 50 s: 12.5 s each, so 8 updates in mae's time, 2 epochs of 4.
    assert seen[-1][1] == ["run.epochs=1", "run.max_steps=8", "run.epochs=2"]

    # With the runs' steady speeds (median logged images/s) recorded, their ratio decides, not the whole times:
    # mae_amt's steps run at 250 images/s against mae's 100, so 4 updates of mae buy 10 of mae_amt.
    seen.clear()
    speeds = {"mae": 100.0, "mae_amt": 250.0}

    def fake_steady(arm, family, seed, common, run_out, loaders):
        scores = fake(arm, family, seed, common, run_out, loaders)
        if arm is not None and arm.name in speeds:
            scores["step_images_per_s"] = speeds[arm.name]
        return scores

    monkeypatch.setattr(study, "_run_one", fake_steady)
    run_study(["mae_amt_equal_time", "mae", "mae_amt"], out=tmp_path / "steady", quick=True, log=lambda *_: None)
    assert seen[-1] == ("mae_amt_equal_time", ["run.epochs=1", "run.max_steps=10", "run.epochs=3"])
    with pytest.raises(ValueError, match="arm 'mae_amt_equal_time' needs arms 'mae' and 'mae_amt' in the same study"):
        run_study(["mae_amt_equal_time"], out=tmp_path, quick=True)


def test_bad_arm_and_epochs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config 'nope': not a file, nor one of the recipes"):
        run_study(["nope"], out=tmp_path)
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):
        run_study(["mae"], out=tmp_path, epochs=0)


def _record_calls(monkeypatch) -> list[str]:
    """Stub the study's training: each run asked for is recorded by name and scores the same."""
    calls = []

    def fake(arm, family, seed, common, run_out, loaders):
        calls.append(arm.name if arm else f"random_{family}")
        return {"knn": 0.5, "linear": 0.25, "updates": 0 if arm is None else 4}

    monkeypatch.setattr(study, "_run_one", fake)
    monkeypatch.setattr(study, "_finetune", lambda *args: 0.5)
    return calls


def test_done_runs_are_kept_and_changed_settings_rerun(tmp_path, monkeypatch):
    calls = _record_calls(monkeypatch)
    run_study(["mae", "moco"], out=tmp_path, quick=True, log=lambda *_: None)
    assert calls == ["random_cnn", "random_vit", "mae", "moco"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["moco"]["0"]["knn"] == 0.5 and saved["settings"]["epochs"] == 1
    run_study(["mae", "moco"], out=tmp_path, quick=True, log=lambda *_: None)
    assert len(calls) == 4  # nothing rerun
    run_study(["mae"], out=tmp_path, quick=True, overrides=["optim.lr=1e-3"], log=lambda *_: None)
    assert calls[4:] == ["random_vit", "mae"]  # other settings: a new study
    # A recipe edited after its runs were recorded: those runs are trained again, the others kept.
    recipe = tmp_path / "my_mae.yaml"
    recipe.write_text("task: pretrain\nobjective:\n  name: mae\noptim:\n  lr: 0.001\n")
    run_study([str(recipe)], out=tmp_path / "edit", quick=True, log=lambda *_: None)
    run_study([str(recipe)], out=tmp_path / "edit", quick=True, log=lambda *_: None)
    assert calls[6:] == ["random_vit", str(recipe)]
    recipe.write_text("task: pretrain\nobjective:\n  name: mae\noptim:\n  lr: 0.002\n")
    run_study([str(recipe)], out=tmp_path / "edit", quick=True, log=lambda *_: None)
    assert calls[8:] == [str(recipe)]
    assert (tmp_path / "results.png").stat().st_size > 1000
    # Holding the images in memory gives the same batches: not a change of setting.
    mae = study._arm_for("mae")
    assert study.arm_fingerprint(mae, ["data.in_memory=true"]) == study.arm_fingerprint(mae, [])
    assert study.arm_fingerprint(mae, ["data.length=100"]) != study.arm_fingerprint(mae, [])


def test_a_fresh_folder_starts_from_a_saved_study_and_trains_only_what_it_lacks(tmp_path, monkeypatch):
    # A fresh clone has docs/study.json but no runs/study: the recorded runs are kept, the rest trained.
    calls = _record_calls(monkeypatch)
    quiet = {"quick": True, "log": lambda *_: None}
    run_study(["mae"], out=tmp_path / "a", **quiet)
    assert calls == ["random_vit", "mae"]
    saved = tmp_path / "a" / "results.json"
    # The saved study names its data by its folder: the same folder, as a fresh clone's runs/study is.
    fresh = tmp_path / "a"
    saved = saved.rename(tmp_path / "saved.json")
    run_study(["mae", "moco"], out=fresh, start_from=saved, **quiet)
    assert calls[2:] == ["random_cnn", "moco"]  # mae and random_vit came from the saved study
    runs = json.loads((fresh / "results.json").read_text())["runs"]
    assert set(runs) == {"random_vit", "mae", "random_cnn", "moco"} and runs["mae"]["0"]["knn"] == 0.5
    with pytest.raises(ValueError, match=r"recorded under other settings \(differing: \['common'\]\)"):
        run_study(["mae"], out=tmp_path / "c", start_from=saved, overrides=["optim.lr=1e-3"], **quiet)
    assert not (tmp_path / "c" / "results.json").exists()


@pytest.mark.slow
def test_quick_study_trains_its_arms_for_the_same_updates_and_fine_tunes_the_masked_image_ones(tmp_path):
    # A masked-image arm, one with a refreshed cache and throwing, a siamese one; the equal-time arms' scheduling
    # is tested above without training (test_equal_time_arm_runs_after_its_pair_for_the_updates_its_steps_buy).
    arms = ["mae", "mae_amt", "moco"]
    # Two runs at once, each in a spawned process with one core (one after another is the other tests' way).
    result = run_study(arms, out=tmp_path, quick=True, log=lambda *_: None, jobs_at_once=2)
    assert set(result.runs) == {"random_cnn", "random_vit", "mae", "mae_amt", "moco"}
    for name, runs in result.runs.items():
        (run,) = runs.values()
        trained = not name.startswith("random_")
        assert run["updates"] == (4 if trained else 0), name  # 512 images, batch 128, one epoch
        assert 0.0 <= run["knn"] <= 1.0 and 0.0 <= run["linear"] <= 1.0
        assert ("finetune" in run) == (name not in ("moco", "random_cnn")), name
        assert ("images_per_s" in run) == ("step_images_per_s" in run) == trained and run["train_seconds"] >= 0
        if name.startswith("mae"):  # where the run's own masks land on held-out shapes
            assert set(run["placement"]) == {"visible", "masked", "all"} | ({"thrown"} if "amt" in name else set())
        elif trained:
            assert run["placement"] is None, name  # moco: no patch mask
    assert result.settings["data"] == {**study.STUDY_DATA, "length": 512}
    table = (tmp_path / "results.md").read_text()
    assert len(table.splitlines()) == 2 + 2 + len(arms)
    assert "| mae_amt | mae | 4 |" in table
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert (tmp_path / "data" / "shapes-512-32px-grey-first51.beton").is_file()  # the labelled tenth


@pytest.mark.slow
def test_budget_curves_evaluate_every_checkpoint_and_random_init(tmp_path):
    from masklab.recipes.config import DataConfig

    assert study.STUDY_BATCH == DataConfig().batch_size  # the batch the study's updates are counted in
    curves = study.run_curves(["mae"], out=tmp_path, epochs=2, every=1, quick=True, log=lambda *_: None)
    assert sorted(curves.runs["mae"], key=int) == ["0", "4", "8"]  # 4 updates an epoch
    assert [p["updates"] for p in curves.runs["mae"].values()] == [0, 4, 8]
    # Each MAE checkpoint also drives AMT's and AttMask's masks: where they would land on held-out shapes.
    assert set(curves.runs["mae"]["4"]["placement"]) == {"mae_amt", "mae_attmask"}
    assert "thrown" in curves.runs["mae"]["8"]["placement"]["mae_amt"] and "placement" not in curves.runs["mae"]["0"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    again = study.run_curves(["mae"], out=tmp_path, epochs=2, every=1, quick=True, log=lambda *_: None)
    assert again.runs == curves.runs  # kept, not rerun
    table = study.curves_table(curves).splitlines()
    assert table[0] == "| arm | 0 updates | 4 updates | 8 updates |"
    with pytest.raises(ValueError, match="need epochs >= 1 and 1 <= every <= epochs, got epochs=2, every=3"):
        study.run_curves(["mae"], out=tmp_path, epochs=2, every=3)


def test_fresh_curves_start_from_saved_ones_and_draw_only_what_they_lack(tmp_path, monkeypatch):
    # A fresh clone has docs/study_curves.json but no runs/study: the drawn curves are kept, the rest drawn.
    drawn = []
    monkeypatch.setattr(study, "_evaluate", lambda cfg, model, loaders: {"knn": 0.5, "linear": 0.5})
    monkeypatch.setattr(study, "_place_curve", lambda *_: False)

    def train(arm, overrides, log):  # no checkpoints: the curve is its random-init point only
        drawn.append(arm.name)
        return None, None, 1.0, None

    monkeypatch.setattr(study, "_train_resumable", train)
    kwargs = {"epochs": 2, "every": 1, "quick": True, "log": lambda *_: None}
    study.run_curves(["mae"], out=tmp_path / "a", **kwargs)
    saved = (tmp_path / "a" / "curves.json").rename(tmp_path / "saved.json")
    curves = study.run_curves(["mae", "moco"], out=tmp_path / "a", start_from=saved, **kwargs)
    assert drawn == ["mae", "moco"] and set(curves.runs) == {"mae", "moco"}  # mae came from the saved curves
    again = study.run_curves(["mae"], out=tmp_path / "a", start_from=tmp_path / "missing.json", **kwargs)
    assert drawn == ["mae", "moco"] and again.runs == curves.runs  # out has its curves.json: start_from unread
    with pytest.raises(ValueError, match=r"recorded under other settings \(differing: \['common', 'epochs'\]\)"):
        study.run_curves(["mae"], out=tmp_path / "b", start_from=saved, **{**kwargs, "epochs": 3})
    assert not (tmp_path / "b" / "curves.json").exists()


def test_a_curve_stopped_between_sittings_goes_on_from_its_last_checkpoint(tmp_path, monkeypatch):
    import shutil

    import torch

    import masklab.recipes.train as train_module

    def checksum(cfg, model, loaders):  # the scores stand for the weights: a sum over every parameter
        total = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
        return {"knn": total, "linear": total}

    monkeypatch.setattr(study, "_evaluate", checksum)
    monkeypatch.setattr(study, "_place_curve", lambda *_: False)
    tiny = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "objective.decoder_dim=32"]
    tiny += ["objective.decoder_depth=1"]
    kwargs = {"epochs": 2, "every": 1, "quick": True, "overrides": tiny, "log": lambda *_: None}
    full = study.run_curves(["mae"], out=tmp_path / "full", **kwargs)
    assert "resumed" not in full.runs["mae"]["0"]

    train = train_module.train

    def stopped(cfg):  # an earlier sitting ended after update 6: its checkpoint at 4 (one an epoch) is left
        cfg.run.stop_at = 6
        train(cfg)
        shutil.rmtree(tmp_path / "cut" / "curve-mae" / "checkpoints" / "ckpt-00000006")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        study.run_curves(["mae"], out=tmp_path / "cut", **kwargs)
    assert not (tmp_path / "cut" / "curves.json").exists()
    monkeypatch.setattr(train_module, "train", train)
    resumed = study.run_curves(["mae"], out=tmp_path / "cut", **kwargs)
    points = resumed.runs["mae"]
    first = points["0"]
    assert first["resumed"]["update"] == 4 and 0 < first["resumed"]["seconds"] < first["train_seconds"]
    assert sorted(points, key=int) == ["0", "4", "8"]
    for updates, point in full.runs["mae"].items():
        torch.testing.assert_close(points[updates]["knn"], point["knn"], rtol=1e-6, atol=0)


def test_a_study_in_progress_names_the_arms_still_to_run_and_the_cli_reports_it_without_training(tmp_path, capsys):
    from masklab.recipes.cli import main

    run = {"knn": 0.3, "linear": 0.3, "updates": 4, "seconds": 60.0}
    result = RunScores(
        settings={"epochs": 1, "length": 512},
        runs={"random_vit": {s: run for s in "012"}, "mae": {s: run for s in "012"}, "mae_amt": {"0": run}},
    )
    arms = [Arm("mae", "mae"), Arm("mae_amt", "mae_amt", "mae"), Arm("simmim", "simmim")]
    text = study.study_markdown(result, arms, plot=None)
    assert (
        "A study in progress: 1 of 3 arms have all their seeds; still to run at this setting: mae_amt, simmim" in text
    )
    done = RunScores(settings=result.settings, runs={**result.runs, "mae_amt": {s: run for s in "012"}})
    assert "A study in progress" not in study.study_markdown(done, arms[:2], plot=None)

    # --from-results: the table, the plot and the README's section from results.json, nothing trained.
    assert main(["study", "--from-results", "--out", str(tmp_path)]) == 2
    assert f"--from-results: no {tmp_path / 'results.json'}; run the study first" in capsys.readouterr().err
    result.save(tmp_path / "results.json")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- study:start -->\nold\n<!-- study:end -->\n")
    # No curves drawn in --out (a fresh clone): the section keeps the README's committed budget curves.
    committed = tmp_path / study.README_CURVE_FIGURES
    committed.parent.mkdir()
    committed.write_text((Path(study.__file__).parents[1] / study.README_CURVE_FIGURES).read_text())
    assert main(["study", "--from-results", "--out", str(tmp_path), "--readme", str(readme)]) == 0
    section = readme.read_text()
    assert "Budget curves (kNN / linear;" in section and "| mae | " in section
    assert (
        "still to run at this setting: mae_amt, mae_random_throw, mae_amt_late, simmim" in section
        and "old" not in section
    )
    assert "| mae |  | 4 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "docs" / "study.png").is_file() and (tmp_path / "docs" / "study.json").is_file()
    assert not (tmp_path / "mae-seed0").exists() and not (tmp_path / "data").exists()  # nothing trained, no data


def test_curve_checkpoints_drive_the_attention_reading_masks(tmp_path, monkeypatch):
    import masklab.tools.placement as placement

    seen = []

    def fake(checkpoint, background="grey", mask_of=None):
        seen.append((checkpoint.name, mask_of))
        return {"visible": 0.1, "masked": 0.4 if mask_of == "mae_amt" else 0.3, "all": 0.2}

    monkeypatch.setattr(placement, "mask_placement", fake)
    for name in ("ckpt-00000004", "ckpt-00000008"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    scores = {"knn": 0.3, "linear": 0.3}
    points = {"0": {**scores, "updates": 0}, "4": {**scores, "updates": 4}}
    points["8"] = {**scores, "updates": 8, "placement": {"done": {}}}
    assert study._place_curve(points, "mae", tmp_path)
    assert seen == [("ckpt-00000004", "mae_amt"), ("ckpt-00000004", "mae_attmask")]  # 8 had its placement
    assert not study._place_curve(points, "mae", tmp_path) and len(seen) == 2  # nothing left to place
    assert not study._place_curve({"4": {"updates": 4}}, "moco", tmp_path)  # no masks read moco's checkpoints
    del points["8"]["placement"]
    study._place_curve(points, "mae", tmp_path)
    curves = RunScores(settings={"epochs": 2, "every": 1, "seed": 0}, runs={"mae": points})
    table = study.curve_placement_table(curves).splitlines()
    assert table[0] == "| mask, from | 4 updates | 8 updates |"
    assert table[2:] == [
        "| mae_amt, from mae | 0.400 / 0.100 | 0.400 / 0.100 |",
        "| mae_attmask, from mae | 0.300 / 0.100 | 0.300 / 0.100 |",
    ]
    text = study.study_markdown(RunScores(runs={}), [], plot=None, curves=curves)
    assert "whose cells are 0.200 object overall" in text and table[2] in text


def test_runs_at_once_record_what_one_after_another_records_with_equal_time_arms_last(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    events = []

    def fake(arm, family, seed, common, run_out, loaders):
        name = arm.name if arm else f"random_{family}"
        events.append(("start", name))
        steps = [c for c in common if c.startswith("run.max_steps")]
        return {
            "knn": 0.5,
            "linear": 0.25,
            "updates": 4,
            "train_seconds": {"mae": 100.0, "mae_amt": 50.0}.get(name, 1.0),
            "steps": steps,
        }

    monkeypatch.setattr(study, "_run_one", fake)
    monkeypatch.setattr(study, "_finetune", lambda *args: 0.5)
    arms = ["mae_amt_equal_time", "mae", "mae_amt", "moco"]
    one = run_study(arms, out=tmp_path / "one", quick=True, log=lambda *_: None)
    monkeypatch.setattr(study, "_pool", lambda workers: ThreadPoolExecutor(workers))  # the scheduling, in threads
    logged = []
    events.clear()
    two = run_study(arms, out=tmp_path / "two", quick=True, log=logged.append, jobs_at_once=2)

    def strip(r):  # the times, and the fingerprints of settings that name each study's own data folder
        return {
            n: {s: {k: v for k, v in x.items() if k not in ("seconds", "config")} for s, x in runs.items()}
            for n, runs in r.runs.items()
        }

    assert strip(two) == {n: {s: {**x, "at_once": 2} for s, x in runs.items()} for n, runs in strip(one).items()}
    assert {x["at_once"] for runs in one.runs.values() for x in runs.values()} == {1} and len(logged) == 6
    # The equal-time arm starts only once the others are recorded: 8 of mae_amt's updates in mae's time.
    assert events[-1] == ("start", "mae_amt_equal_time") and two.runs["mae_amt_equal_time"]["0"]["steps"] == [
        "run.max_steps=8"
    ]
    assert logged[-1].startswith("mae_amt_equal_time seed 0:")
    with pytest.raises(ValueError, match="jobs_at_once must be at least 1, got 0"):
        run_study(arms, out=tmp_path, quick=True, jobs_at_once=0)


def test_a_run_stopped_between_sittings_resumes_from_its_last_checkpoint_as_if_uninterrupted(tmp_path, monkeypatch):
    import shutil

    import torch

    def weights(cfg, model, loaders):  # the scores stand for the trained weights
        return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}

    monkeypatch.setattr(study, "_evaluate", weights)
    monkeypatch.setattr(study, "RESUME_EVERY", 3)
    data, _, data_common, _ = study._study_data(tmp_path, quick=True)
    tiny = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "objective.decoder_dim=32"]
    common = study._common(data, 2, True, [*data_common, *tiny, "objective.decoder_depth=1"])
    mae = study._arm_for("mae")
    full = study._run_one(mae, "vit", 0, common, tmp_path / "full", {})
    assert full["updates"] == 8 and "resumed" not in full  # 512 images at batch 128, 2 epochs
    # An earlier sitting stopped after update 4, before its checkpoint: only update 3's is there.
    cut = tmp_path / "cut"
    study._run_one(mae, "vit", 0, [*common, "run.stop_at=4", "run.keep=2"], cut, {})
    shutil.rmtree(cut / "checkpoints" / "ckpt-00000004")
    resumed = study._run_one(mae, "vit", 0, common, cut, {})
    assert resumed["updates"] == 8 and resumed["resumed"]["update"] == 3
    assert 0 < resumed["resumed"]["seconds"] < resumed["train_seconds"]  # the earlier sitting's time counts
    for name, value in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, atol=1e-6, rtol=0)
    assert [int(r.split(",")[0]) for r in (cut / "metrics.csv").read_text().splitlines()[1:]] == list(range(1, 9))
    # Stopped after its last update (during evaluation): nothing left to train, the same weights and checkpoint.
    again = study._run_one(mae, "vit", 0, common, cut, {})
    assert again["resumed"]["update"] == 8 and again["checkpoint"] == resumed["checkpoint"]
    for name, value in full["weights"].items():
        torch.testing.assert_close(again["weights"][name], value, atol=1e-6, rtol=0)
    # A folder whose checkpoint was written under another config (here a seed) is trained afresh.
    other = study._run_one(mae, "vit", 1, common, cut, {})
    assert other["updates"] == 8 and "resumed" not in other
