"""A run you can watch: the kNN monitor during pretraining, the trackers, the evaluation on shards."""

import csv

import pytest
import torch

from masklab.pipeline import Batch
from masklab.recipes.accelerator import trackers
from masklab.recipes.config import load_config
from masklab.recipes.evaluate import extract_features
from masklab.recipes.train import train

from .test_train import TINY as TRAIN_TINY

TINY = TRAIN_TINY  # each test sets run.epochs


def test_every_epochs_writes_a_knn_column_at_each_epochs_last_update(tmp_path):
    result = train(load_config("mae", [*TINY, "run.epochs=3", "eval.every_epochs=1", f"run.out={tmp_path}"]))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result.updates == 12
    scored = {int(r["update"]): float(r["knn"]) for r in rows if r["knn"]}
    assert sorted(scored) == [4, 8, 12]  # 4 updates an epoch
    assert all(0 <= v <= 1 for v in scored.values())


def test_every_two_epochs_and_at_end_agree_with_the_evaluation_of_the_checkpoint(tmp_path):
    from masklab.recipes.train import evaluate_checkpoint

    cfg = load_config("mae", [*TINY, "run.epochs=2", "eval.every_epochs=2", "eval.at_end=true", f"run.out={tmp_path}"])
    result = train(cfg)
    with open(tmp_path / "metrics.csv") as f:
        scored = [float(r["knn"]) for r in csv.DictReader(f) if r["knn"]]
    assert scored == [result.knn] == [evaluate_checkpoint(result.checkpoint, "knn")["knn"]]


def test_sharded_features_are_gathered_once_each_in_index_order():
    def batches(rank):  # two ranks; the second shard is padded with image 0 again
        shards = {0: [[0, 2], [4]], 1: [[1, 3], [0]]}[rank]
        for ids in shards:
            index = torch.tensor(ids)
            yield Batch(images=index.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2), labels=index % 2, index=index)

    other = list(batches(1))

    def gather(part):  # stands for Accelerate's gather over the two ranks
        theirs = other.pop(0)
        their_part = (theirs.images[:, 0, 0, :1], theirs.labels, theirs.index)
        return tuple(torch.cat([a, b]) for a, b in zip(part, their_part, strict=True))

    feats, labels = extract_features(lambda x: x[:, 0, 0, :1], batches(0), gather)
    assert feats.flatten().tolist() == [0, 1, 2, 3, 4] and labels.tolist() == [0, 1, 0, 1, 0]


def test_unlabelled_evaluation_data_is_refused_clearly():
    batch = Batch(images=torch.zeros(2, 3, 2, 2), labels=torch.tensor([-1, -1]), index=torch.arange(2))
    with pytest.raises(ValueError, match="need labelled images"):
        extract_features(lambda x: x.flatten(1), [batch])


def test_trackers_resolve_names_and_refuse_what_is_not_installed(monkeypatch):
    assert trackers(["none"]) == []
    assert trackers(["auto"]) == ["tensorboard"]  # a dev dependency
    assert "tensorboard" in trackers(["all"])
    with pytest.raises(ValueError, match=r"run.log_with asks for \['aim'\], not installed: pip install aim"):
        trackers(["aim"])
    with pytest.raises(ValueError, match="unknown trackers"):
        load_config("mae", ["run.log_with=[tensorbored]"])


def test_wandb_offline_run_logs_loss_and_knn(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(
        "mae", [*TINY, "run.epochs=1", "eval.every_epochs=1", "run.log_with=[wandb,tensorboard]", f"run.out={tmp_path}"]
    )
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list((tmp_path / "masklab").rglob("events.out.tfevents*"))
