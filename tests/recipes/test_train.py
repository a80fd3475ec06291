import csv
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from masklab.recipes.checkpoint import load_checkpoint
from masklab.recipes.config import load_config
from masklab.recipes.train import evaluate_checkpoint, train

TINY = [
    "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "objective.decoder_dim=32",
    "objective.decoder_depth=1",
    "data.resolution=16",
    "data.length=64",
    "data.batch_size=16",
    "run.epochs=3",
    "run.progress=false",
    "run.log_every=2",
    "eval.at_end=false",
    "optim.warmup_epochs=1",
]


def losses_of(out):
    with open(out / "metrics.csv") as f:
        return {int(r["update"]): float(r["loss"]) for r in csv.DictReader(f)}


def full_and_resumed(recipe, overrides, tmp_path, stop_at=5, abs_tol=1e-5):
    """Train ``recipe`` once straight through and once stopped at ``stop_at`` and resumed; the losses
    after the stop must match. Returns ``(full, resumed)`` for checks of their state."""
    full = train(load_config(recipe, [*overrides, f"run.out={tmp_path / 'full'}", "run.ckpt_every=100"]))
    cut = [*overrides, f"run.out={tmp_path / 'cut'}", f"run.ckpt_every={stop_at}"]
    train(load_config(recipe, [*cut, f"run.stop_at={stop_at}"]))
    resumed = train(load_config(recipe, [*cut, "run.resume=auto"]))
    a, b = losses_of(tmp_path / "full"), losses_of(tmp_path / "cut")
    assert sorted(b) == list(range(1, full.updates + 1))
    for update in range(stop_at + 1, full.updates + 1):
        assert b[update] == pytest.approx(a[update], abs=abs_tol), update
    return full, resumed


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    full = train(load_config("mae", [*TINY, f"run.out={tmp_path / 'full'}", "run.ckpt_every=100"]))
    assert full.updates == 12  # 64 images / 16 per batch = 4 updates per epoch, 3 epochs
    stopped = train(load_config("mae", [*TINY, f"run.out={tmp_path / 'cut'}", "run.ckpt_every=2", "run.stop_at=5"]))
    assert stopped.updates == 5
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [
        "ckpt-00000002",
        "ckpt-00000004",
        "ckpt-00000005",
    ]
    resumed = train(load_config("mae", [*TINY, f"run.out={tmp_path / 'cut'}", "run.ckpt_every=2", "run.resume=auto"]))
    assert resumed.updates == 12
    a, b = losses_of(tmp_path / "full"), losses_of(tmp_path / "cut")
    assert sorted(b) == list(range(1, 13))
    for update in range(6, 13):
        assert b[update] == pytest.approx(a[update], abs=1e-6), update
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=0)


def test_resume_from_a_middle_checkpoint_after_a_crash_drops_the_lost_rows(tmp_path):
    out = tmp_path / "run"
    train(load_config("mae", [*TINY, f"run.out={out}", "run.ckpt_every=4", "run.stop_at=7", "run.keep=5"]))
    # A crash after update 7: the checkpoint of update 7 never made it.
    shutil.rmtree(out / "checkpoints" / "ckpt-00000007")
    train(
        load_config(
            "mae",
            [*TINY, f"run.out={out}", "run.ckpt_every=4", f"run.resume={out / 'checkpoints' / 'ckpt-00000004'}"],
        )
    )
    full = train(load_config("mae", [*TINY, f"run.out={tmp_path / 'full'}"]))
    got, want = losses_of(out), losses_of(tmp_path / "full")
    assert sorted(got) == list(range(1, 13))
    assert all(got[u] == pytest.approx(want[u], abs=1e-6) for u in range(1, 13))
    assert full.updates == 12


def test_outputs_keep_last_k_and_leave_no_temporary_files(tmp_path):
    out = tmp_path / "run"
    result = train(load_config("mae", [*TINY, f"run.out={out}", "run.ckpt_every=1", "run.keep=2"]))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["ckpt-00000011", "ckpt-00000012"]
    assert sorted(p.name for p in (out / "checkpoints" / names[-1]).iterdir()) == [
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "scheduler.bin",
        "state.pt",
    ]
    assert (out / "loss.png").exists() and (out / "config.yaml").exists()
    assert len(losses_of(out)) == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    with open(out / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["masked_fraction"]) == pytest.approx(0.75) and float(row["images_per_s"]) > 0


def test_a_run_trains_on_the_test_device_through_the_dataset_loader(device, tmp_path):
    # A ViT (MAE) and a CNN Siamese (MixMask-MoCo): the loader's crops, views and masks on the device.
    mae = train(load_config("mae", [*TINY, f"run.out={tmp_path / 'mae'}", "run.max_steps=3", f"run.device={device}"]))
    moco = train(
        load_config(
            "mixmask_moco", [*SIAMESE_TINY, f"run.out={tmp_path / 'moco'}", "run.max_steps=3", f"run.device={device}"]
        )
    )
    for result in (mae, moco):
        assert result.updates == 3 and all(torch.isfinite(torch.tensor(result.losses)))
        assert {p.device for p in result.model.parameters()} == {device}


def test_gradient_accumulation_halves_the_updates(tmp_path):
    result = train(load_config("mae", [*TINY, f"run.out={tmp_path}", "optim.grad_accum=2"]))
    assert result.updates == 6


@pytest.mark.parametrize("recipe", ["simmim", "supervised"])
def test_other_recipes_train(recipe, tmp_path):
    base = [o for o in TINY if not o.startswith("model.kwargs")] if recipe == "supervised" else TINY
    extra = ["model.backbone=resnet18", "data.resolution=32"] if recipe == "supervised" else []
    result = train(load_config(recipe, [*base, *extra, f"run.out={tmp_path}", "run.max_steps=3"]))
    assert result.updates == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_eval_of_a_checkpoint_and_of_random_init(tmp_path):
    result = train(load_config("mae", [*TINY, f"run.out={tmp_path}", "run.max_steps=2"]))
    scores = evaluate_checkpoint(result.checkpoint, "knn")
    assert 0 <= scores["knn"] <= 1
    linear = evaluate_checkpoint(result.checkpoint, "linear", ["eval.linear_epochs=5"])
    assert 0 <= linear["linear"] <= 1
    random = evaluate_checkpoint("random", "knn", TINY)
    assert 0 <= random["knn"] <= 1


def run_on_two_cpu_processes(script, code: str, port: int) -> None:
    """Write ``code`` (indented as in the test) to ``script`` and run it under ``torchrun --nproc_per_node 2``."""
    script.write_text(textwrap.dedent(code))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-4000:]


def train_on_two_cpu_processes(tmp_path, recipe: str, overrides: list[str], port: int):
    """``train`` under ``torchrun --nproc_per_node 2``; each rank's indices, weights and world size."""
    run_on_two_cpu_processes(
        tmp_path / "two.py",
        f"""
        import os, torch
        from masklab.recipes.config import load_config
        from masklab.recipes.train import train
        result = train(load_config({recipe!r}, {overrides!r}))
        torch.save({{"indices": result.indices, "weights": result.model.state_dict(), "world": int(os.environ["WORLD_SIZE"])}},
                   {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
        """,
        port,
    )
    return torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")


@pytest.mark.slow
def test_two_cpu_processes_train_on_disjoint_shards_with_identical_weights(tmp_path):
    overrides = [*TINY, f"run.out={tmp_path / 'run'}", "run.record_indices=true", "data.length=68"]
    r0, r1 = train_on_two_cpu_processes(tmp_path, "mae", overrides, 29531)
    assert r0["world"] == r1["world"] == 2
    # 68 images on 2 ranks: 34 each, 2 batches of 16 per epoch; each epoch's shards are disjoint.
    per_epoch = 32
    for epoch in range(3):
        a = set(r0["indices"][epoch * per_epoch : (epoch + 1) * per_epoch].tolist())
        b = set(r1["indices"][epoch * per_epoch : (epoch + 1) * per_epoch].tolist())
        assert len(a) == len(b) == per_epoch and not a & b
    for name, value in r0["weights"].items():
        torch.testing.assert_close(r1["weights"][name], value)


def test_finetune_from_a_pretraining_checkpoint_with_layer_decay_and_lars(tmp_path):
    pre = train(load_config("mae", [*TINY, f"run.out={tmp_path / 'pre'}", "run.max_steps=2"]))
    tuned = train(
        load_config(
            "finetune",
            [
                *TINY,
                f"run.out={tmp_path / 'ft'}",
                f"model.init={pre.checkpoint}",
                "optim.layer_decay=0.75",
                "run.max_steps=2",
            ],
        )
    )
    state = load_checkpoint(pre.checkpoint, training_state=False).model
    assert tuned.updates == 2
    # The classifier started from the pretrained encoder: its patch embedding moved only by two small steps.
    start = state["backbone.model.patch_embed.proj.weight"]
    now = tuned.model.model.patch_embed.proj.weight.detach()
    assert (now - start).abs().max() < 0.05
    lars = train(
        load_config(
            "supervised",
            [
                f"run.out={tmp_path / 'lars'}",
                "optim.name=lars",
                "optim.lr=0.1",
                "run.max_steps=2",
                "data.length=64",
                "data.batch_size=16",
                "run.progress=false",
                "eval.at_end=false",
            ],
        )
    )
    assert lars.updates == 2 and all(torch.isfinite(torch.tensor(lars.losses)))


def test_amt_refreshes_on_schedule_and_resume_restores_the_cache(tmp_path):
    amt = [*TINY, "run.epochs=4", "run.ckpt_every=100"]
    full = train(load_config("mae_amt", [*amt, f"run.out={tmp_path / 'full'}"]))
    stage = next(s for s in _loader_stages(full) if hasattr(s, "refreshes"))
    assert int(stage.refreshes) == 3  # epochs 1, 2 and 3 of 4 (every 10%, at least one epoch)
    train(load_config("mae_amt", [*amt, f"run.out={tmp_path / 'cut'}", "run.ckpt_every=3", "run.stop_at=7"]))
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "ckpt-00000007").state
    assert state["stages"]["stages.1._extra_state"]["refreshes"] == 1  # refreshed at the start of epoch 1 (updates 5-8)
    resumed = train(load_config("mae_amt", [*amt, f"run.out={tmp_path / 'cut'}", "run.resume=auto"]))
    a, b = losses_of(tmp_path / "full"), losses_of(tmp_path / "cut")
    for update in range(8, 17):
        assert b[update] == pytest.approx(a[update], abs=1e-6), update
    torch.testing.assert_close(list(_loader_stages(resumed))[1].cache, stage.cache)


def _loader_stages(result):
    return result.stages


@pytest.mark.parametrize("recipe,backbone", [("mae_amt", None), ("simmim_amt", None), ("simmim_amt", "resnet18")])
def test_amt_recipes_train_past_the_first_refresh(recipe, backbone, tmp_path):
    base = TINY if backbone is None else [o for o in TINY if not o.startswith("model.kwargs")]
    extra = [] if backbone is None else [f"model.backbone={backbone}", "data.resolution=32"]
    result = train(load_config(recipe, [*base, *extra, f"run.out={tmp_path}", "run.max_steps=6"]))
    stage = list(result.stages)[1]
    assert int(stage.refreshes) == 1 and stage.active
    assert result.updates == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["thrown_fraction"]) == 0.0  # random masking before the refresh
    assert float(rows[-1]["thrown_fraction"]) > 0.2  # masking and throwing after it


@pytest.mark.slow
def test_two_processes_share_one_amt_cache(tmp_path):
    overrides = [*TINY, f"run.out={tmp_path / 'run'}", "data.length=68"]
    run_on_two_cpu_processes(
        tmp_path / "amt.py",
        f"""
        import os, torch
        from masklab.recipes.config import load_config
        from masklab.recipes.train import train
        result = train(load_config("mae_amt", {overrides!r}))
        stage = list(result.stages)[1]
        torch.save({{"cache": stage.cache, "refreshes": int(stage.refreshes)}}, {str(tmp_path)!r} + f"/amt{{os.environ['RANK']}}.pt")
        """,
        29533,
    )
    a, b = torch.load(tmp_path / "amt0.pt"), torch.load(tmp_path / "amt1.pt")
    assert a["refreshes"] == b["refreshes"] == 2
    # Each rank computed half the maps; after the gather both hold every image's map.
    torch.testing.assert_close(a["cache"], b["cache"])
    assert a["cache"].shape[0] == 68 and not torch.allclose(a["cache"], torch.ones_like(a["cache"]))
    assert (a["cache"].flatten(1).std(1) > 0).all()


@pytest.mark.parametrize("recipe,backbone", [("ehm", None), ("simmim_ehm", "resnet18")])
def test_ehm_recipes_evolve_the_level_and_step_the_teacher(recipe, backbone, tmp_path):
    base = TINY if backbone is None else [o for o in TINY if not o.startswith("model.kwargs")]
    extra = [] if backbone is None else [f"model.backbone={backbone}", "data.resolution=32"]
    cfg = load_config(recipe, [*base, *extra, f"run.out={tmp_path}", "run.max_steps=6"])
    result = train(cfg)
    stage = list(result.stages)[1]
    assert type(stage).__name__ == "HierarchicalMask" and stage.guide is not None
    assert stage.progress == 1.0  # max_steps ends the schedule: the last level is in use
    cells = (cfg.data.resolution // (4 if backbone is None else cfg.data.resolution // 8)) ** 2
    assert stage.num_regions(cells) == max(1, round(cells * 0.05)) < stage.num_regions(cells, 0.0) == cells // 2
    [(teacher, student)] = result.model.teachers()
    moved = [not torch.equal(t, s) for t, s in zip(teacher.module.parameters(), student.parameters(), strict=True)]
    assert any(moved) and all(not p.requires_grad for p in teacher.parameters())
    assert result.updates == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    with open(tmp_path / "metrics.csv") as f:
        fractions = {round(float(r["masked_fraction"]), 4) for r in csv.DictReader(f)}
    assert fractions == {round(round(cells * cfg.mask.ratio) / cells, 4)}


@pytest.mark.parametrize("recipe", ["ehm", "mae_hpm"])  # the guide reads the resumed model, the stage its progress
def test_guided_resumed_run_equals_an_uninterrupted_one(recipe, tmp_path):
    guided = [*TINY, "run.ckpt_every=100"]
    full = train(load_config(recipe, [*guided, f"run.out={tmp_path / 'full'}"]))
    train(load_config(recipe, [*guided, f"run.out={tmp_path / 'cut'}", "run.ckpt_every=3", "run.stop_at=6"]))
    resumed = train(load_config(recipe, [*guided, f"run.out={tmp_path / 'cut'}", "run.resume=auto"]))
    a, b = losses_of(tmp_path / "full"), losses_of(tmp_path / "cut")
    assert sorted(b) == list(range(1, 13))
    for update in range(7, 13):
        assert b[update] == pytest.approx(a[update], abs=1e-6), update
    for name, value in full.model.state_dict().items():  # the teacher included
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=0)


def test_mae_hpm_binds_the_difficulty_guide_and_ends_at_half_the_masked_cells_hard(tmp_path):
    cfg = load_config("mae_hpm", [*TINY, f"run.out={tmp_path}", "run.max_steps=6"])
    result = train(cfg)
    stage = list(result.stages)[1]
    assert type(stage).__name__ == "HardPatchMask" and stage.guide is not None
    assert stage.progress == 1.0 and stage.hard_count(16) == 6 > stage.hard_count(16, 0.0) == 0  # 12 masked of 16
    assert result.updates == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    with open(tmp_path / "metrics.csv") as f:
        assert {float(r["masked_fraction"]) for r in csv.DictReader(f)} == {0.75}


def test_ehm_without_a_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"mask 'ehm' reads an EMA teacher's affinity: set objective.teacher_decay"):
        train(load_config("ehm", [*TINY, f"run.out={tmp_path}", "objective.teacher_decay=null"]))


SIAMESE_TINY = [
    *(o for o in TINY if not o.startswith(("model.", "objective."))),
    "model.kwargs={channels: [8, 16, 32, 64], stem_width: 8}",
    "objective.proj_hidden=32",
    "objective.proj_dim=16",
    "objective.pred_hidden=32",
    "objective.queue_size=40",
]


@pytest.mark.parametrize("recipe", ["moco", "mixmask_moco", "byol", "mixmask_byol"])
def test_siamese_recipes_train(recipe, tmp_path):
    result = train(load_config(recipe, [*SIAMESE_TINY, f"run.out={tmp_path}", "run.max_steps=3"]))
    assert result.updates == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    model = result.model
    assert model.backbone.model.conv1.stride == (1, 1)  # the small-image stem
    if "moco" in recipe:
        assert int(model.queue.ptr) == 3 * 16 % 40  # every update enqueued its batch's keys (queue of 40)
    # The momentum encoder moved with the online one but never trained itself.
    teacher = model.momentum.module[0].model.conv1.weight
    assert not teacher.requires_grad and not torch.equal(teacher, model.backbone.model.conv1.weight)


def test_siamese_recipe_needs_views(tmp_path):
    with pytest.raises(ValueError, match="set data.views to a Views preset"):
        train(load_config("moco", [*SIAMESE_TINY, f"run.out={tmp_path}", "data.views=null"]))


@pytest.mark.slow
def test_resumed_mixmask_moco_run_equals_an_uninterrupted_one_queue_included(tmp_path):
    full, resumed = full_and_resumed("mixmask_moco", SIAMESE_TINY, tmp_path)
    state = resumed.model.state_dict()
    for name in ("queue.keys", "queue.ptr"):
        torch.testing.assert_close(state[name], full.model.state_dict()[name], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_cpu_processes_share_one_queue_and_momentum_encoder(tmp_path):
    overrides = [*SIAMESE_TINY, f"run.out={tmp_path / 'run'}", "data.length=68", "run.epochs=2"]
    r0, r1 = train_on_two_cpu_processes(tmp_path, "mixmask_moco", overrides, 29532)
    # 2 epochs x 2 batches of 16 per rank x 2 ranks = 128 keys through a queue of 40: both ranks gathered all.
    assert int(r0["weights"]["queue.ptr"]) == int(r1["weights"]["queue.ptr"]) == 128 % 40
    for name, value in r0["weights"].items():
        if "running_" not in name:  # batch-norm statistics are per rank on CPU (SyncBN needs GPUs)
            torch.testing.assert_close(r1["weights"][name], value, msg=name)


@pytest.mark.slow
def test_two_cpu_processes_save_through_accelerate_and_resume_exactly(tmp_path):
    base = [*TINY, "data.length=68"]  # 2 batches of 16 per rank and epoch: 6 updates
    cut = [*base, f"run.out={tmp_path / 'cut'}", "run.ckpt_every=3"]
    # One launch per run: Accelerate's end_training ends the process group.
    full = train_on_two_cpu_processes(tmp_path, "mae", [*base, f"run.out={tmp_path / 'full'}"], 29534)
    train_on_two_cpu_processes(tmp_path, "mae", [*cut, "run.stop_at=3"], 29535)
    resumed = train_on_two_cpu_processes(tmp_path, "mae", [*cut, "run.resume=auto"], 29536)
    # Each process saved its own generators; the main process the rest, once.
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints" / "ckpt-00000003").iterdir()) == [
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "scheduler.bin",
        "state.pt",
    ]
    a, b = losses_of(tmp_path / "full"), losses_of(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for update in range(4, 7):
        assert b[update] == pytest.approx(a[update], abs=1e-6), update
    for rank in (0, 1):
        for name, value in full[rank]["weights"].items():
            torch.testing.assert_close(resumed[rank]["weights"][name], value, atol=1e-6, rtol=0, msg=name)
