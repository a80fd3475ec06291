import pytest
import torch
import torch.nn.functional as F

from masklab.objectives import CNNBackbone, MaskDeep, ViTBackbone, build_backbone, maskdeep_loss, masked_pool
from masklab.pipeline import Batch
from masklab.transforms import FeatureMask, Views, feature_masks

SMALL = {"hidden": 32, "dim": 16, "pred_hidden": 32}


def two_view_batch(model: MaskDeep, size: int = 64, n: int = 4, seed: int = 0) -> Batch:
    batch = Views(2, "byol")(Batch(images=torch.rand(n, 3, size, size), seed=seed))
    return model.mask_stage()(batch)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_the_encoder_runs_once_per_view_whatever_the_groups(groups):
    torch.manual_seed(0)
    model = MaskDeep(CNNBackbone.from_name("resnet18"), strides=(8, 16, 32), groups=groups, **SMALL)
    student, teacher = count_calls(model.backbone.model), count_calls(model.momentum.module["backbone"].model)
    heads = count_calls(model.predictors["global"])
    out = model(two_view_batch(model))
    assert student == [2] and teacher == [2]  # two views, whatever G
    assert heads == [2]  # each view's G groups go through the heads as one (B * G) batch
    out.loss.backward()


def test_masked_cells_do_not_reach_the_prediction():
    torch.manual_seed(0)
    model = MaskDeep(CNNBackbone.from_name("resnet18"), strides=(8, 16, 32), groups=3, **SMALL).eval()
    images = torch.rand(2, 3, 64, 64)
    masks = feature_masks(2, (64, 64), (8, 16, 32), ratio=0.5, groups=3, generator=torch.Generator().manual_seed(1))
    maps = model.levels(model.backbone, images, model.strides)
    before = model.predict(maps, masks)  # (T, B, G, D); in eval mode the groups are independent
    for group in range(3):
        changed = [
            torch.where(masks[s][:, group : group + 1], f + 100 * torch.randn_like(f), f)
            for f, s in zip(maps, model.strides, strict=True)
        ]
        after = model.predict(changed, masks)
        torch.testing.assert_close(after[:, :, group], before[:, :, group])
        assert not torch.allclose(after, before)  # other groups see some of those cells
    # A visible cell does reach its group's prediction.
    visible = ~masks[8][:, :1]
    moved = [torch.where(visible, maps[0] + 1.0, maps[0]), *maps[1:]]
    assert not torch.allclose(model.predict(moved, masks)[:, :, 0], before[:, :, 0])


def test_masked_pool_by_hand():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])  # (1, 2, 2, 2)
    masked = torch.tensor([[[[True, False], [False, False]], [[True, True], [True, False]]]])  # (1, 2, 2, 2)
    pooled = masked_pool(features, masked)
    torch.testing.assert_close(pooled, torch.tensor([[[3.0, 30.0], [4.0, 40.0]]]))


def test_loss_by_hand():
    # T=2 targets, B=1, G=2 groups, D=2.
    predictions = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[1.0, 1.0], [-1.0, 0.0]]]])
    targets = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
    # cosines: target 0: 1, 0; target 1: 1/sqrt(2), 0 -> mean negative cosine
    expected = -(1.0 + 0.0 + 2**-0.5 + 0.0) / 4
    assert maskdeep_loss(predictions, targets).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"predictions \(T, B, G, D\) \(2, 1, 2, 2\) do not match targets"):
        maskdeep_loss(predictions, targets[:1])


def test_the_objective_equals_the_loss_on_its_own_predictions_and_targets():
    torch.manual_seed(0)
    model = MaskDeep(CNNBackbone.from_name("resnet18"), strides=(16, 32), groups=2, targets="global", **SMALL)
    batch = two_view_batch(model)
    x1, x2 = batch.views
    m1, m2 = batch.extras["view_feature_masks"]
    out = model(batch)
    p1 = model.predict(model.levels(model.backbone, x1, model.strides), m1)
    p2 = model.predict(model.levels(model.backbone, x2, model.strides), m2)
    z1, z2 = model.target(x1), model.target(x2)
    assert p1.shape == (1, 4, 2, 16) and z1.shape == (1, 4, 16)  # one target (global), B=4, G=2
    cos = lambda p, z: F.cosine_similarity(p, z.unsqueeze(2), dim=-1).mean()  # noqa: E731
    torch.testing.assert_close(out.loss, -(cos(p1, z2) + cos(p2, z1)) / 2)


def test_multi_target_has_one_target_per_stage_and_the_global_one():
    torch.manual_seed(0)
    model = MaskDeep(CNNBackbone.from_name("resnet18"), strides=(8, 16, 32), groups=2, **SMALL)
    assert sorted(model.projectors) == ["global", "stride16", "stride32", "stride8"]
    assert model.target(torch.rand(3, 3, 64, 64)).shape == (4, 3, 16)


def test_the_teacher_gets_no_gradients_and_follows_by_ema():
    torch.manual_seed(0)
    model = MaskDeep(CNNBackbone.from_name("resnet18"), strides=(8, 16, 32), groups=2, momentum=0.5, **SMALL)
    model(two_view_batch(model)).loss.backward()
    teacher = model.momentum.module
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in model.backbone.parameters())
    [(ema, student)] = model.teachers()
    before = teacher["projectors"]["global"][0].weight.clone()
    with torch.no_grad():
        model.projectors["global"][0].weight.add_(1.0)
    ema.update(student, progress=0.0)
    torch.testing.assert_close(teacher["projectors"]["global"][0].weight, before + 0.5)


def test_vit_stages_come_from_evenly_spaced_blocks():
    torch.manual_seed(0)
    vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3)
    model = MaskDeep(vit, strides=(4, 8, 16), groups=2, **SMALL)
    blocks = [count_calls(block) for block in vit.model.blocks]
    maps = model.levels(vit, torch.rand(2, 3, 32, 32), model.strides)
    assert [tuple(m.shape) for m in maps] == [(2, 192, 8, 8), (2, 192, 4, 4), (2, 192, 2, 2)]
    assert [c[0] for c in blocks] == [1, 1, 1]  # one pass through the blocks for all three stages
    out = model(two_view_batch(model, size=32))
    assert torch.isfinite(out.loss)


def test_vit_stages_are_the_normed_tokens_of_the_chosen_blocks_by_hand():
    torch.manual_seed(0)
    vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2).eval()
    images = torch.rand(2, 3, 32, 32)
    maps = MaskDeep.levels(vit, images, (4, 8, 16))
    x, normed = vit.embed(images), []
    for block in vit.model.blocks:
        x = block(x)
        normed.append(vit.model.norm(x)[:, vit.num_prefix :].transpose(1, 2).reshape(2, 192, 8, 8))
    # Depth 2, three stages: blocks 0, 0 and 1 (round(2 * k / 3) - 1), each average-pooled to its stride.
    expected = [normed[0], F.avg_pool2d(normed[0], 2), F.avg_pool2d(normed[1], 4)]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_feature_mask_draws_one_set_per_view_at_the_views_size():
    batch = Views(2, "byol", size=32)(Batch(images=torch.rand(2, 3, 64, 64), seed=0))
    out = FeatureMask((8, 16), 0.5, groups=3)(batch)
    assert out.extras["feature_masks"][8].shape == (2, 3, 8, 8)
    first, second = out.extras["view_feature_masks"]
    assert first[8].shape == (2, 3, 4, 4) and second[16].shape == (2, 3, 2, 2)
    assert not torch.equal(first[8], second[8])


def test_errors_name_the_bad_value():
    cnn = build_backbone("resnet18")
    with pytest.raises(
        ValueError, match=r"the backbone has no stage of stride \[64\]; its strides are \[2, 4, 8, 16, 32\]"
    ):
        MaskDeep(cnn, strides=(16, 64), **SMALL)
    with pytest.raises(ValueError, match=r"targets must be one of \('global', 'multi'\), got 'all'"):
        MaskDeep(cnn, targets="all", **SMALL)
    vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
    with pytest.raises(ValueError, match=r"ViT strides must be multiples of the patch size 4, got \[6\]"):
        MaskDeep(vit, strides=(6, 12), **SMALL)
    model = MaskDeep(cnn, strides=(16, 32), groups=2, **SMALL)
    with pytest.raises(ValueError, match=r"MaskDeep needs two views in batch.views"):
        model(Batch(images=torch.rand(2, 3, 64, 64)))
    other = FeatureMask((16, 32), 0.5, groups=3)(Views(2, "byol")(Batch(images=torch.rand(2, 3, 64, 64), seed=0)))
    with pytest.raises(
        ValueError, match=r"have strides \(16, 32\) and 3 groups; this MaskDeep expects strides \(16, 32\) and 2"
    ):
        model(other)
