import pytest
import torch
from timm.optim import Lars
from torch import nn

from masklab.objectives import sincos_pos_embed
from masklab.pipeline import Batch
from masklab.recipes.build import build_loader, build_model, build_optimizer, peak_lr, sync_batchnorm
from masklab.recipes.config import load_config
from masklab.transforms import MixMask, Normalize, Views, random_patch_mask

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


def test_in_memory_builtin_data_is_generated_once_and_gives_the_generated_batches():
    from masklab.pipeline import InMemoryImages

    cfg = load_config("mae", ["data.length=40", "data.batch_size=8", "data.num_workers=0"])
    held_cfg = load_config("mae", ["data.length=40", "data.batch_size=8", "data.num_workers=0", "data.in_memory=true"])
    held = build_loader(held_cfg, "train", torch.device("cpu"))
    assert isinstance(held.dataset, InMemoryImages) and len(held.dataset) == 40
    assert build_loader(held_cfg, "train", torch.device("cpu")).dataset is held.dataset  # the next run's too
    test = build_loader(held_cfg, "test", torch.device("cpu"), train=False)
    assert len(test.dataset) == 10 and test.dataset is not held.dataset
    read = build_loader(cfg, "train", torch.device("cpu"))
    assert not isinstance(read.dataset, InMemoryImages)
    for a, b in zip(read, held, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.mask.states, b.mask.states)


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


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def decay_of(optimizer):
    """``{parameter shape: weight decay}`` over the optimizer's groups."""
    return {tuple(p.shape): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_mae_trains_adamw_with_maes_betas_and_never_its_fixed_positions():
    fixed = "objective.fixed_pos_embed=true"  # the option's default; the shapes recipe learns them
    cfg = load_config("mae", ["model.kwargs={depth: 1}", "data.resolution=16", "objective.decoder_dim=32", fixed])
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == (0.9, 0.95)
    pos = model.backbone.model.pos_embed
    assert all(p is not pos for group in optimizer.param_groups for p in group["params"])
    trained = {p for group in optimizer.param_groups for p in group["params"]}
    assert trained == {p for p in model.parameters() if p.requires_grad}
    images = torch.rand(4, 3, 16, 16)
    batch = Batch(images=images, mask=random_patch_mask(4, (4, 4), 0.75))
    decoder_before = model.decoder_pred.weight.detach().clone()
    model(batch).loss.backward()
    optimizer.step()
    assert not torch.equal(model.decoder_pred.weight, decoder_before)  # the step did train
    torch.testing.assert_close(pos[0], sincos_pos_embed((4, 4), 192, num_prefix=1), rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["moco", "mixmask_moco"])
def test_siamese_recipes_use_classical_momentum_not_nesterov(recipe):
    optimizer = build_optimizer(load_config(recipe), small_net())
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["nesterov"] is False and optimizer.defaults["momentum"] == 0.9


def test_timms_sgd_is_nesterov():
    optimizer = build_optimizer(load_config("moco", ["optim.name=sgd"]), small_net())
    assert optimizer.defaults["nesterov"] is True


def test_moco_decays_biases_and_norm_weights_and_byol_does_not():
    moco = decay_of(build_optimizer(load_config("moco"), small_net()))
    assert moco == {(8, 4): 5e-4, (8,): 5e-4, (2, 8): 5e-4, (2,): 5e-4}
    byol = decay_of(build_optimizer(load_config("byol"), small_net()))
    assert byol == {(8, 4): 1e-5, (8,): 0.0, (2, 8): 1e-5, (2,): 0.0}


@pytest.mark.parametrize("recipe", ["byol", "mixmask_byol", "maskdeep"])
def test_the_byol_recipes_train_with_lars_at_base_rate_one(recipe):
    cfg = load_config(recipe)
    net = small_net()
    optimizer = build_optimizer(cfg, net)
    assert type(optimizer) is Lars and optimizer.defaults["momentum"] == 0.9
    assert optimizer.defaults["lr"] == pytest.approx(1.0 * 128 / 256)
    before = net[0].weight.detach().clone()
    net(torch.rand(8, 4)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(net[0].weight, before)


def test_base_lr_scales_by_the_global_batch():
    cfg = load_config("mae", ["optim.base_lr=1.5e-4", "data.batch_size=128", "optim.grad_accum=2"])
    assert peak_lr(cfg, processes=4) == pytest.approx(1.5e-4 * 128 * 2 * 4 / 256)
    assert build_optimizer(cfg, small_net(), processes=4).defaults["lr"] == pytest.approx(6e-4)
    assert peak_lr(load_config("mae", ["optim.lr=0.01"]), processes=4) == 0.01


def amt_and_simmim_stages(overrides=()):
    """The mask stages the CLI builds for the simmim_amt and simmim recipes (``masklab train NAME``)."""
    from masklab.recipes.build import mask_stages

    def stage(recipe):
        (built,) = mask_stages(load_config(recipe, list(overrides)), "vit", num_samples=8)
        return built

    return stage("simmim_amt"), stage("simmim")


def test_simmim_amt_masks_and_throws_the_cells_simmim_masks():
    amt, simmim = amt_and_simmim_stages()
    assert (amt.mask_patch_size, amt.patch_size) == (simmim.mask_patch_size, simmim.patch_size) == (8, 4)
    # At SimMIM's own scale (224 px, 16 px patches, 32 px cells), after a refresh, with crops and flips:
    # 22 masked and 13 thrown of the 49 cells, every cell's 4 patches in one state.
    from masklab.pipeline import Batch, RandomResizedCrop
    from masklab.transforms import MASKED, THROWN

    amt, simmim = amt_and_simmim_stages(["data.resolution=224", "model.patch_size=16", "mask.mask_patch_size=32"])
    assert (amt.mask_patch_size, amt.patch_size) == (simmim.mask_patch_size, simmim.patch_size) == (32, 16)
    amt.bind(lambda images, grid: torch.rand(len(images), *grid, generator=torch.Generator().manual_seed(1)))
    images = torch.rand(8, 3, 256, 256)
    amt.refresh([Batch(images=images, index=torch.arange(8))], (14, 14))
    batch = RandomResizedCrop(224, flip_p=0.5)(Batch(images=images, index=torch.arange(8), seed=0))
    mask = amt(batch).mask
    blocks = mask.states.view(8, 7, 2, 7, 2)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    cells = blocks[:, :, 0, :, 0].flatten(1)
    assert (cells == MASKED).sum(1).tolist() == [22] * 8 and (cells == THROWN).sum(1).tolist() == [13] * 8
    # SimMIM itself masks ceil(49 * 0.6) = 30 of those cells.
    assert simmim(Batch(images=torch.zeros(2, 3, 224, 224), seed=0)).mask.regrid(7, 7).counts == (19, 30, 0)


def test_simmim_amt_warms_up_at_0_44_on_cells_and_refreshes_every_fifth_of_the_run():
    from masklab.pipeline import Batch
    from masklab.recipes.build import mask_stages

    amt, _ = amt_and_simmim_stages()
    (mae_amt,) = mask_stages(load_config("mae_amt"), "vit", num_samples=8)
    assert [e for e in range(20) if amt.refresh_due(e, 20)] == [4, 8, 12, 16]  # the authors': 40, 80, 120, 160 of 200
    assert [e for e in range(20) if mae_amt.refresh_due(e, 20)] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    # Before the first refresh, on a 32 px image: ceil(16 * 0.44) = 8 random cells of the 4x4 cells (8 px),
    # nothing thrown; MAE-AMT: round(64 * 0.75) = 48 random patches.
    images = Batch(images=torch.zeros(4, 3, 32, 32), index=torch.arange(4), seed=0)
    assert amt(images).mask.regrid(4, 4).counts == (8, 8, 0)
    assert mae_amt(images).mask.counts == (16, 48, 0)
