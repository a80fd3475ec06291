import pytest
import torch
import torch.nn.functional as F

from masklab.objectives import IJEPA, OBJECTIVES, build_backbone, ijepa_loss
from masklab.pipeline import Batch
from masklab.transforms import MASKED, THROWN, VISIBLE, PatchMask, random_patch_mask


def tiny_ijepa(seed=0, **kwargs):
    torch.manual_seed(seed)
    vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    return IJEPA(vit, **{"predictor_dim": 32, "predictor_depth": 1, **kwargs})


def three_state_mask():
    """Two samples on a 4x4 grid: 6 VISIBLE (the context), 6 MASKED (the targets), 4 THROWN."""
    states = torch.full((2, 4, 4), VISIBLE, dtype=torch.uint8)
    states[:, 2, :] = MASKED
    states[0, 3, :2], states[1, 0, 2:] = MASKED, MASKED
    states[0, 3, 2:], states[0, 1, :2] = THROWN, THROWN
    states[1, 3, :2], states[1, 3, 2:] = THROWN, THROWN
    return PatchMask(states, (6, 6, 4))


def test_the_loss_is_smooth_l1_between_predictions_and_the_normalised_teacher_features():
    assert ijepa_loss(torch.tensor([[[0.5, 3.0]]]), torch.zeros(1, 1, 2)).item() == pytest.approx((0.125 + 2.5) / 2)
    model, mask = tiny_ijepa(), three_state_mask()
    with torch.no_grad():  # a teacher apart from the student, so the targets show whose features they are
        for param in model.teacher.module.parameters():
            param.add_(0.1 * torch.randn_like(param))
    images = torch.rand(2, 3, 32, 32)
    teacher = model.teacher.module
    every = PatchMask(torch.zeros(2, 4, 4, dtype=torch.uint8), (16, 0, 0))
    tokens = teacher.encode_visible(images, every)[:, teacher.num_prefix :]  # (2, 16, 32), grid order
    normalised = (tokens - tokens.mean(-1, keepdim=True)) / (tokens.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    expected_targets = torch.stack([normalised[b, mask.ids_masked[b]] for b in range(2)])
    torch.testing.assert_close(model.targets(images, mask), expected_targets, rtol=1e-4, atol=1e-5)
    student = model.backbone.encode_visible(images, every)[:, 1:]
    student_targets = torch.stack([F.layer_norm(student, (32,))[b, mask.ids_masked[b]] for b in range(2)])
    assert not torch.allclose(expected_targets, student_targets, atol=1e-3)
    out = model(Batch(images=images, mask=mask))
    predicted = model.predict(images, mask)
    assert predicted.shape == (2, 6, 32)
    diff = (predicted - expected_targets).abs()
    by_hand = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    torch.testing.assert_close(out.loss, by_hand, rtol=1e-5, atol=1e-6)
    assert out.logs["masked"].item() == 6


def test_the_context_encoder_sees_the_context_only_and_the_teacher_sees_the_whole_image():
    model, mask = tiny_ijepa().eval(), three_state_mask()
    images = torch.rand(2, 3, 32, 32)
    changed = images.clone()
    changed[:, :, 16:24, :] = torch.rand(2, 3, 8, 32)  # row 2: MASKED in both samples
    changed[:, :, 24:32, 16:32] = torch.rand(2, 3, 8, 16)  # THROWN in both
    torch.testing.assert_close(model.predict(changed, mask), model.predict(images, mask))
    assert not torch.allclose(model.targets(changed, mask), model.targets(images, mask))


def test_gradients_reach_the_context_encoder_and_predictor_never_the_teacher():
    model = tiny_ijepa()
    out = model(Batch(images=torch.rand(2, 3, 32, 32), mask=random_patch_mask(2, (4, 4), 0.5)))
    out.loss.backward()
    assert model.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0 and model.predictor_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.module.parameters())
    ((teacher, student),) = model.teachers()
    assert student is model.backbone and teacher.decay_at(0.0) == pytest.approx(0.996)
    assert teacher.decay_at(1.0) == pytest.approx(1.0)


def test_bad_settings_and_inputs_are_named():
    with pytest.raises(ValueError, match=r"predictor_dim=30 must be divisible by 4 and by predictor_heads=4"):
        tiny_ijepa(predictor_dim=30)
    with pytest.raises(ValueError, match="predictor_depth must be at least 1, got 0"):
        tiny_ijepa(predictor_depth=0)
    model = tiny_ijepa()
    with pytest.raises(ValueError, match="IJEPA needs a PatchMask with MASKED cells"):
        model(Batch(images=torch.rand(2, 3, 32, 32)))
    cnn = build_backbone("resnet18", small_stem=True)
    with pytest.raises(ValueError, match="ijepa"):
        IJEPA(cnn)


def test_the_ijepa_recipe_is_multiblock_masks_without_flips_and_an_ema_target_encoder():
    from masklab.recipes.build import build_loader, build_model
    from masklab.recipes.config import load_config
    from masklab.transforms import MultiBlockMask

    assert OBJECTIVES["ijepa"].takes == "patch" and OBJECTIVES["ijepa"].families == ("vit",)
    cfg = load_config("ijepa", ["data.length=32", "data.batch_size=8", "data.num_workers=0"])
    assert cfg.data.flip_p == 0.0 and cfg.objective.teacher_decay == 0.996
    loader = build_loader(cfg, "train", torch.device("cpu"))
    assert isinstance(loader.chain.stages[-1], MultiBlockMask)
    model = build_model(cfg)
    assert isinstance(model, IJEPA)
    batch = next(iter(loader))
    assert batch.mask.num_masked > 0 and torch.isfinite(model(batch).loss)
