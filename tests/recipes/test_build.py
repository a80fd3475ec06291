import pytest
import torch

from masklab.recipes.build import build_loader, build_model, sync_batchnorm
from masklab.recipes.config import load_config
from masklab.transforms import MixMask, Normalize, Views

SMALL = ["data.length=32", "data.batch_size=8", "model.kwargs={channels: [8, 16, 32, 64], stem_width: 8}"]


def test_siamese_loader_cuts_views_before_normalising_and_mixes_the_query_view_after():
    cfg = load_config("mixmask_moco", SMALL)
    loader = build_loader(cfg, "train", torch.device("cpu"), "cnn")
    assert [type(s) for s in loader.chain.stages] == [Views, Normalize, MixMask]
    assert loader.chain.stages[2].view == 0 and loader.chain.stages[2].grid == 4
    batch = next(iter(loader))
    own = batch.mix["own"].bool()
    torch.testing.assert_close(
        batch.mix["images"], torch.where(own, batch.views[0], batch.views[0][batch.mix["partner"]])
    )
    # Evaluation loaders see whole images: no views, no mixing.
    assert [type(s) for s in build_loader(cfg, "test", torch.device("cpu"), "cnn", train=False).chain.stages] == [
        Normalize
    ]


def test_sync_batchnorm_only_for_several_gpu_processes():
    cfg = load_config("moco", SMALL)
    model = build_model(cfg)
    assert sync_batchnorm(cfg, model, torch.device("cpu"), 2) is model
    assert sync_batchnorm(cfg, model, torch.device("cuda"), 1) is model
    converted = sync_batchnorm(cfg, build_model(cfg), torch.device("cuda"), 2)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.momentum.modules())


def test_an_unknown_backbone_is_named_with_the_closest_timm_names():
    with pytest.raises(ValueError) as error:
        build_model(load_config("mae", ["model.backbone=vit_tinyy_patch16_224"]))
    message = str(error.value)
    assert message.startswith("model.backbone 'vit_tinyy_patch16_224' is not a timm model; close names: ")
    assert "vit_tiny_patch16_224" in message


@pytest.mark.parametrize(
    "recipe,kwargs,expected,listed",
    [
        (
            "mae",
            "{dept: 1}",
            "model.kwargs key 'dept' is not an argument of vit_tiny_patch16_224 (timm's "
            "VisionTransformer); did you mean 'depth'? it takes: ",
            "embed_dim",
        ),
        (
            "supervised",
            "{depth: 1}",
            "model.kwargs key 'depth' is not an argument of resnet18 (timm's ResNet); it takes: ",
            "stem_width",
        ),
    ],
)
def test_kwargs_the_timm_constructor_does_not_take_are_named_with_close_matches(recipe, kwargs, expected, listed):
    with pytest.raises(ValueError) as error:
        build_model(load_config(recipe, ["data.length=32", f"model.kwargs={kwargs}"]))
    message = str(error.value)
    assert message.startswith(expected)
    assert listed in message.split("it takes: ")[1].split(", ")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.patch_size=3"], "data.resolution=32 is not divisible by model.patch_size=3"),
        (["data.resolution=30"], "data.resolution=30 is not divisible by model.patch_size=4"),
        (["mask.ratio=0.001"], "mask.ratio=0.001 masks round(0.001 * 64) = 0 of the 64 cells of a 32 px image"),
    ],
)
def test_a_mask_grid_that_cannot_work_fails_before_the_loader_starts(overrides, message, monkeypatch):
    from masklab.recipes import build

    monkeypatch.setattr(build, "DatasetLoader", lambda *a, **k: pytest.fail("the loader was built"))
    cfg = load_config("mae", ["data.length=32", *overrides])
    with pytest.raises(ValueError) as error:
        build_loader(cfg, "train", torch.device("cpu"), "vit")
    assert message in str(error.value)
