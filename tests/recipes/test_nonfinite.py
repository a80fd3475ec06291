"""A NaN or infinite loss stops the run (naming the update), or is skipped up to run.skip_nonfinite times."""

import pytest
import torch

from masklab.objectives import MAE
from masklab.recipes.checkpoint import list_checkpoints
from masklab.recipes.config import load_config
from masklab.recipes.metrics import NonFiniteLoss
from masklab.recipes.train import train

from .test_train import TINY as TRAIN_TINY

TINY = [*TRAIN_TINY, "run.epochs=2"]


@pytest.fixture
def nan_at(monkeypatch):
    """Make MAE's loss NaN at the given (1-based) calls of its forward."""
    calls = {"n": 0, "bad": set()}
    forward = MAE.forward

    def patched(self, batch):
        calls["n"] += 1
        out = forward(self, batch)
        if calls["n"] in calls["bad"]:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MAE, "forward", patched)
    return calls


def test_a_nan_loss_stops_the_run_naming_the_update_and_writes_no_checkpoint_after_it(tmp_path, nan_at):
    nan_at["bad"].add(3)
    cfg = load_config("mae", [*TINY, f"run.out={tmp_path}", "run.ckpt_every=2", "run.log_every=3"])
    with pytest.raises(NonFiniteLoss, match=r"the loss is nan at update 3; the last finite loss was .* at update 2"):
        train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-00000002"]


def test_skip_nonfinite_skips_the_update_and_counts(tmp_path, nan_at):
    nan_at["bad"].update({2, 5})
    result = train(load_config("mae", [*TINY, f"run.out={tmp_path / 'a'}", "run.skip_nonfinite=2"]))
    assert result.updates == 8 and sum(1 for v in result.losses if v != v) == 2
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    nan_at["n"] = 0
    with pytest.raises(NonFiniteLoss, match="at update 5"):
        train(load_config("mae", [*TINY, f"run.out={tmp_path / 'b'}", "run.skip_nonfinite=1"]))


def test_skip_nonfinite_must_not_be_negative():
    with pytest.raises(ValueError, match="run.skip_nonfinite must be 0 or more"):
        load_config("mae", ["run.skip_nonfinite=-1"])
