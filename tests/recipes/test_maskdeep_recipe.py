"""The maskdeep recipe end to end through the loader: views, feature masks, EMA teacher, resume."""

import pytest
import torch

from masklab.recipes.config import load_config
from masklab.recipes.train import train

from .test_train import full_and_resumed

MASKDEEP_TINY = [
    "model.kwargs={channels: [8, 16, 32, 64], stem_width: 8}",
    "objective.proj_hidden=32",
    "objective.proj_dim=16",
    "objective.pred_hidden=32",
    "data.resolution=16",
    "data.length=64",
    "data.batch_size=16",
    "mask.strides=[2, 4, 8]",  # 8x8, 4x4 and 2x2 maps at 16 px with the small-image stem
    "mask.groups=2",
    "run.epochs=3",
    "run.progress=false",
    "run.log_every=2",
    "eval.at_end=false",
    "optim.warmup_epochs=1",
]


def test_maskdeep_recipe_trains_with_per_view_feature_masks(tmp_path):
    result = train(load_config("maskdeep", [*MASKDEEP_TINY, f"run.out={tmp_path}", "run.max_steps=3"]))
    assert result.updates == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    names = [type(s).__name__ for s in result.stages]
    assert names == ["Views", "Normalize", "FeatureMask"]
    model = result.model
    assert (
        model.strides == (2, 4, 8)
        and model.groups == 2
        and sorted(model.projectors)
        == [
            "global",
            "stride2",
            "stride4",
            "stride8",
        ]
    )
    teacher = model.momentum.module["backbone"].model.conv1.weight
    assert not teacher.requires_grad and not torch.equal(teacher, model.backbone.model.conv1.weight)


def test_maskdeep_resumed_run_equals_an_uninterrupted_one(tmp_path):
    full, resumed = full_and_resumed("maskdeep", MASKDEEP_TINY, tmp_path)
    for name, value in full.model.state_dict().items():  # the EMA teacher included
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-5, rtol=0)


def test_maskdeep_needs_views(tmp_path):
    with pytest.raises(ValueError, match="objective 'maskdeep' needs two views: set data.views"):
        train(load_config("maskdeep", [*MASKDEEP_TINY, f"run.out={tmp_path}", "data.views=null"]))
