"""Checkpoints: safetensors weights and a weights-only state; nothing read from a file runs code."""

import errno
import json
import logging
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from masklab.objectives import sincos_pos_embed
from masklab.recipes import checkpoint as checkpoint_module
from masklab.recipes.checkpoint import CheckpointError, load_checkpoint
from masklab.recipes.cli import main
from masklab.recipes.config import load_config
from masklab.recipes.train import load_trained, train

from .test_train import TINY


class WritesAFile:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-update MAE run with a checkpoint after each update."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = train(load_config("mae", [*TINY, f"run.out={out}", "run.max_steps=2", "run.ckpt_every=1"]))
    return result


@pytest.fixture
def crafted(tmp_path, trained):
    """``(file, marker)``: a checkpoint-like ``.pt`` whose unpickling would create ``marker``."""
    marker = tmp_path / "ran-code"
    file = tmp_path / "evil.pt"
    config = json.loads(safe_open(trained.checkpoint / "model.safetensors", "pt").metadata()["config"])
    torch.save({"model": WritesAFile(marker), "config": config, "update": 2}, file)
    return file, marker


def crafted_folder(tmp_path, trained, marker):
    """A real checkpoint folder whose ``state.pt`` would create ``marker`` when unpickled."""
    folder = tmp_path / "ckpt-00000002"
    shutil.copytree(trained.checkpoint, folder)
    torch.save({"optimizer": WritesAFile(marker)}, folder / "state.pt")
    return folder


ACCELERATE_FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin", "state.pt"]


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def assert_refused(code, err, file, marker):
    assert code == 2
    assert f"refused to load {file}: it is not only tensors and plain Python values" in err
    assert "unsupported GLOBAL posix.system" in err  # says why: the callable it would run
    assert "pass --trust-checkpoint (config: run.trust_checkpoint=true)" in err
    assert not marker.exists()


def test_a_checkpoint_is_accelerates_state_with_safetensors_weights_and_weights_only_files(trained):
    folder = trained.checkpoint
    assert folder.name == "ckpt-00000002" and sorted(p.name for p in folder.iterdir()) == ACCELERATE_FILES
    with safe_open(folder / "model.safetensors", "pt") as f:
        metadata = f.metadata()
        for name, value in trained.model.state_dict().items():
            torch.testing.assert_close(f.get_tensor(name), value, rtol=0, atol=0)
    assert metadata["format"] == "masklab-checkpoint-2" and metadata["update"] == "2"
    assert json.loads(metadata["config"])["model"]["backbone"] == "vit_tiny_patch16_224"
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["update"] == 2 and state["loader"] == {"seed": 0, "epoch": 0, "step": 2}
    assert {"loader", "stages", "update", "model_extra", "processes", "batches_per_epoch"} == set(state)
    assert state["processes"] == 1 and state["batches_per_epoch"] == 4  # 64 images, batch 16
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    assert all(int(param["step"]) == 2 for param in optimizer["state"].values())  # AdamW took two steps
    assert torch.load(folder / "scheduler.bin", weights_only=True)["t_initial"] == 2
    read = load_checkpoint(folder)
    assert {"optimizer", "scheduler", "loader", "stages", "rng"} <= set(read.state) and list(read.state["rng"]) == [0]
    assert read.update == 2 and read.format == "masklab-checkpoint-2"


@pytest.mark.parametrize("part", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_train_resume_refuses_a_crafted_accelerate_file_and_never_runs_it(trained, tmp_path, part, capsys):
    marker = tmp_path / "ran-code"
    folder = tmp_path / "ckpt-00000002"
    shutil.copytree(trained.checkpoint, folder)
    torch.save({"state": WritesAFile(marker)}, folder / part)
    argv = ["train", "mae", *TINY, f"run.out={tmp_path / 'run'}", "--resume", str(folder)]
    assert_refused(*run_cli(argv, capsys), folder / part, marker)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_a_folder_inside_a_checkpoint_is_refused_unless_trusted(trained, tmp_path):
    folder = tmp_path / "ckpt-00000002"
    shutil.copytree(trained.checkpoint, folder)
    (folder / "pytorch_model_fsdp_0").mkdir()
    with pytest.raises(CheckpointError, match=r"refused to load .*pytorch_model_fsdp_0: a folder of sharded state"):
        load_checkpoint(folder)
    assert load_checkpoint(folder, training_state=False).update == 2  # evaluating never looks at it


def test_an_older_checkpoint_folder_is_evaluated_but_not_resumed(trained, tmp_path, capsys):
    folder = tmp_path / "ckpt-00000002"
    folder.mkdir()
    old = load_checkpoint(trained.checkpoint)
    metadata = {"format": "masklab-checkpoint-1", "update": "2", "config": json.dumps(old.config)}
    save_file(dict(trained.model.state_dict()), folder / "model.safetensors", metadata=metadata)
    torch.save({k: old.state[k] for k in ("optimizer", "scheduler", "loader", "stages")}, folder / "state.pt")
    load_trained(folder)
    same = [*TINY, "run.max_steps=2", "run.ckpt_every=1", f"run.out={tmp_path / 'run'}"]
    code, err = run_cli(["train", "mae", *same, "--resume", str(folder)], capsys)
    assert code == 2
    assert f"checkpoint {folder} is an older masklab's checkpoint without a training state this masklab resumes" in err
    assert "it can be evaluated, or fine-tuned from with model.init, not resumed" in err


def test_eval_refuses_a_crafted_checkpoint_and_never_runs_it(crafted, capsys):
    file, marker = crafted
    assert_refused(*run_cli(["eval", "knn", str(file)], capsys), file, marker)


def test_show_masks_refuses_a_crafted_checkpoint_and_never_runs_it(crafted, tmp_path, capsys):
    file, marker = crafted
    argv = ["show-masks", "--mask", "amt", "--checkpoint", str(file), "--out", str(tmp_path / "m.png")]
    assert_refused(*run_cli(argv, capsys), file, marker)
    assert not (tmp_path / "m.png").exists()


def test_finetune_refuses_a_crafted_model_init_and_never_runs_it(crafted, tmp_path, capsys):
    file, marker = crafted
    argv = ["train", "finetune", *TINY, f"run.out={tmp_path / 'ft'}", f"model.init={file}"]
    assert_refused(*run_cli(argv, capsys), file, marker)
    assert not (tmp_path / "ft" / "metrics.csv").exists()


def test_train_resume_refuses_a_crafted_checkpoint_and_never_runs_it(crafted, tmp_path, capsys):
    file, marker = crafted
    argv = ["train", "mae", *TINY, f"run.out={tmp_path / 'run'}", "--resume", str(file)]
    assert_refused(*run_cli(argv, capsys), file, marker)


def test_train_resume_refuses_a_checkpoint_folder_with_a_crafted_state(trained, tmp_path, capsys):
    marker = tmp_path / "ran-code"
    folder = crafted_folder(tmp_path, trained, marker)
    argv = ["train", "mae", *TINY, f"run.out={tmp_path / 'run'}", "--resume", str(folder)]
    assert_refused(*run_cli(argv, capsys), folder / "state.pt", marker)
    # Evaluating it reads the weights and their config only: the crafted state is never opened.
    load_trained(folder)
    assert not marker.exists()


def test_trust_checkpoint_unpickles_with_a_warning(crafted, caplog):
    file, marker = crafted
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match="is not a masklab checkpoint"):
        load_checkpoint(file, trust=True)
    assert marker.exists()  # the crafted file is live: only the flag let it run
    assert f"unpickling {file} (--trust-checkpoint): this runs any code the file carries" in caplog.text


def test_an_older_single_file_checkpoint_of_plain_values_still_loads(trained, tmp_path):
    file = tmp_path / "ckpt-00000002.pt"
    old = load_checkpoint(trained.checkpoint)
    torch.save({"model": old.model, "config": old.config, "update": 2, **old.state}, file)
    cfg, model = load_trained(file)
    assert cfg.model.kwargs == {"depth": 1, "embed_dim": 32, "num_heads": 2}
    for name, value in trained.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt"])
def test_a_truncated_checkpoint_is_named_as_incomplete(trained, tmp_path, damaged):
    folder = tmp_path / "ckpt-00000002"
    shutil.copytree(trained.checkpoint, folder)
    data = (folder / damaged).read_bytes()
    (folder / damaged).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{folder / damaged} is not a complete checkpoint"):
        load_checkpoint(folder)


def test_a_checkpoint_without_a_config_is_a_clear_error(trained, tmp_path, capsys):
    folder = tmp_path / "ckpt-00000002"
    folder.mkdir()
    save_file(dict(trained.model.state_dict()), folder / "model.safetensors")  # no metadata
    shutil.copy(trained.checkpoint / "state.pt", folder / "state.pt")
    code, err = run_cli(["eval", "knn", str(folder)], capsys)
    assert code == 2 and f"checkpoint {folder} records no training config" in err
    code, err = run_cli(["train", "mae", *TINY, f"run.out={tmp_path / 'run'}", "--resume", str(folder)], capsys)
    assert code == 2 and f"checkpoint {folder} records no training config, so a resume cannot check" in err
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "state.pt"]


def test_a_checkpoint_of_another_architecture_names_both_backbones(trained, tmp_path, capsys):
    argv = ["train", "finetune", f"run.out={tmp_path / 'ft'}", "model.backbone=resnet18", "run.progress=false"]
    code, err = run_cli([*argv, f"model.init={trained.checkpoint}"], capsys)
    assert code == 2
    assert (
        f"checkpoint {trained.checkpoint} does not fit this model: it holds a 'vit_tiny_patch16_224' with "
        "{'depth': 1, 'embed_dim': 32, 'num_heads': 2} backbone, this run builds 'resnet18' (keys " in err
    )
    assert re.search(r"keys \d+ missing: conv1.weight, bn1.weight, bn1.bias, \.\.\.; \d+ unexpected: blocks", err)
    assert len(err) < 600  # a few keys, not torch's wall of every key
    code, err = run_cli(["eval", "knn", str(trained.checkpoint), "model.kwargs.depth=2"], capsys)
    assert code == 2
    assert "this run builds 'vit_tiny_patch16_224' with {'depth': 2, 'embed_dim': 32, 'num_heads': 2}" in err
    assert "(keys 12 missing: backbone.model.blocks.1.norm1.weight, " in err


def test_a_full_disk_while_checkpointing_keeps_the_older_checkpoints(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, calls = checkpoint_module.save_file, []

    def fill_the_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) < 3:
            return real(tensors, path, metadata=metadata)
        path.write_bytes(b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", fill_the_disk)
    code, err = run_cli(["train", "mae", *TINY, f"run.out={out}", "run.ckpt_every=1", "run.max_steps=4"], capsys)
    assert code == 2
    assert f"the disk is full: checkpoint ckpt-00000003 could not be written to {out / 'checkpoints'}" in err
    assert "the older checkpoints are kept (ckpt-00000001, ckpt-00000002)" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000001", "ckpt-00000002"]
    assert load_checkpoint(out / "checkpoints" / "ckpt-00000002").update == 2
    assert not (out / "masklab.lock").exists()  # the failed run let go of its folder


def test_maes_fixed_positions_stay_fixed_through_training_saving_and_loading(tmp_path):
    run = [*TINY, f"run.out={tmp_path}", "run.max_steps=2", "objective.fixed_pos_embed=true"]
    trained = train(load_config("mae", run))  # the option's default, MAE's; the shapes recipe learns them
    table = sincos_pos_embed((4, 4), 32, num_prefix=1).unsqueeze(0)  # 16 px, patch 4, embed_dim 32 (TINY)
    assert torch.equal(trained.model.backbone.model.pos_embed, table)  # after two updates
    with safe_open(trained.checkpoint / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("backbone.model.pos_embed"), table)
    # load_trained rebuilds the model from the recorded config and loads the weights: the table, frozen.
    _, model = load_trained(trained.checkpoint)
    pos = model.backbone.model.pos_embed
    assert torch.equal(pos, table) and not pos.requires_grad
