import pytest
import torch

from masklab.objectives import (
    MAE,
    CNNBackbone,
    EMATeacher,
    SimMIM,
    ViTBackbone,
    build_backbone,
    check_compatible,
    cosine_decay,
    sincos_pos_embed,
)


def vit_attending_to(patch: int, img_size=16, patch_size=4) -> ViTBackbone:
    """A ViT whose last block's CLS query matches one patch's key only.

    Earlier blocks add nothing (zero output projections); patch embeddings are
    zero; only the CLS token and patch ``patch``'s position embedding carry a
    vector ``e``. In the last block q = 8 * LN(x), k = LN(x), so CLS attends to
    that patch.
    """
    vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, depth=3)
    m, d = vit.model, vit.embed_dim
    e = torch.zeros(d)
    e[: d // 2] = 1.0
    with torch.no_grad():
        for block in m.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
        m.patch_embed.proj.weight.zero_()
        m.patch_embed.proj.bias.zero_()
        m.pos_embed.zero_()
        m.pos_embed[0, 1 + patch] = e
        m.cls_token.copy_(e.view(1, 1, -1))
        qkv = m.blocks[-1].attn.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        qkv.weight[:d] = 8 * torch.eye(d)
        qkv.weight[d : 2 * d] = torch.eye(d)
    return vit


@pytest.mark.parametrize("patch", [0, 5, 15])
def test_vit_saliency_peaks_at_the_attended_patch(patch):
    vit = vit_attending_to(patch)
    saliency = vit.saliency(torch.rand(2, 3, 16, 16))
    assert saliency.shape == (2, 4, 4)
    assert saliency.flatten(1).argmax(1).tolist() == [patch, patch]
    assert saliency.min() >= 0 and saliency.max() <= 1
    assert vit.model.blocks[-1].attn.fused_attn  # restored after the probe


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_affinity_is_symmetric_with_the_documented_shape(name):
    bb = build_backbone(name, img_size=32, patch_size=4)
    images = torch.rand(2, 3, 32, 32)
    aff = bb.affinity(images) if bb.family == "vit" else bb.affinity(images, grid=(8, 8))
    assert aff.shape == (2, 64, 64)
    torch.testing.assert_close(aff, aff.transpose(1, 2))
    assert not aff.requires_grad


def test_vit_affinity_is_each_blocks_patch_attention_summed_over_heads_and_blocks():
    torch.manual_seed(0)
    vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=3).eval()
    images = torch.rand(2, 3, 16, 16)
    expected = torch.zeros(2, 16, 16)
    with torch.no_grad():
        x = vit.embed(images)
        for block in vit.model.blocks:  # each block's softmax(q k^T / sqrt(d)) by hand, then the block
            attn = block.attn
            q, k, _ = attn.qkv(block.norm1(x)).view(2, 17, 3, attn.num_heads, attn.head_dim).unbind(2)
            q, k = attn.q_norm(q.transpose(1, 2)), attn.k_norm(k.transpose(1, 2))
            probs = (q @ k.transpose(-2, -1) * attn.head_dim**-0.5).softmax(dim=-1)
            expected += probs[:, :, 1:, 1:].sum(dim=1)
            x = block(x)
    torch.testing.assert_close(vit.affinity(images), (expected + expected.transpose(1, 2)) / 2)
    assert all(block.attn.fused_attn for block in vit.model.blocks)  # restored after the probe


def test_cnn_saliency_is_on_the_grid_in_unit_range():
    cnn = CNNBackbone.from_name("resnet18")
    s = cnn.saliency(torch.rand(3, 3, 64, 64), grid=(8, 8))
    assert s.shape == (3, 8, 8)
    assert torch.allclose(s.flatten(1).amax(1), torch.ones(3)) and torch.allclose(s.flatten(1).amin(1), torch.zeros(3))


def test_unsupported_pairs_say_what_is_supported():
    with pytest.raises(
        ValueError, match=r"objective 'mae' does not take 'cnn' backbones; it supports backbone families \['vit'\]"
    ):
        MAE(CNNBackbone.from_name("resnet18"))
    with pytest.raises(
        ValueError,
        match=r"does not take the 'mixmask' mask; it supports masks \['amt', 'attmask', 'block', 'colormae', 'ehm', 'multiblock', 'random', 'simmim'\]",
    ):
        check_compatible("simmim", mask="mixmask")
    with pytest.raises(ValueError, match=r"unknown objective 'dino'"):
        check_compatible("dino")


def test_not_a_vit_is_refused():
    with pytest.raises(ValueError, match=r"is not a timm ViT: it lacks"):
        ViTBackbone(torch.nn.Linear(2, 2))


def test_ema_teacher_follows_by_schedule_and_gets_no_gradients():
    student = SimMIM(ViTBackbone.from_name("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1))
    teacher = EMATeacher(student.backbone, base=0.9, final=1.0)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert cosine_decay(0.0, 0.9, 1.0) == pytest.approx(0.9) and cosine_decay(1.0, 0.9, 1.0) == pytest.approx(1.0)
    assert cosine_decay(0.5, 0.9, 1.0) == pytest.approx(0.95)
    before = teacher.module.model.patch_embed.proj.weight.clone()
    with torch.no_grad():
        student.backbone.model.patch_embed.proj.weight.add_(1.0)
    teacher.update(student.backbone, progress=0.0)
    torch.testing.assert_close(teacher.module.model.patch_embed.proj.weight, before + 0.1)
    out = teacher(torch.rand(1, 3, 16, 16))
    assert out.grad_fn is None


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_affinity_guidance_reads_the_teacher_and_saliency_the_online_backbone(name):
    torch.manual_seed(0)
    vit = name.startswith("vit")
    size, kwargs = (32, {"patch_size": 4, "depth": 2}) if vit else (128, {})  # resnet18: a 4x4 last stage
    assert SimMIM(build_backbone(name, img_size=size, **kwargs)).teachers() == []
    objective = SimMIM(build_backbone(name, img_size=size, **kwargs), teacher_decay=0.9)
    [(teacher, student)] = objective.teachers()
    assert student is objective.backbone and all(not p.requires_grad for p in teacher.parameters())
    images, grid = torch.rand(2, 3, size, size), (8, 8)
    affinity, saliency = objective.guidance("affinity"), objective.guidance("saliency")
    before_affinity, before_saliency = affinity(images, grid), saliency(images, grid)
    assert before_affinity.shape == (2, 64, 64)
    objective.train()
    with torch.no_grad():  # move the student only: affinity must not change, saliency must
        for p in objective.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.testing.assert_close(affinity(images, grid), before_affinity)
    assert not torch.allclose(saliency(images, grid), before_saliency)
    assert objective.backbone.training and teacher.module.training  # the guide restores the mode
    teacher.update(objective.backbone, progress=0.0)  # now the teacher moves toward the student
    assert not torch.allclose(affinity(images, grid), before_affinity)


def test_small_image_stem_keeps_32_px_maps_until_the_first_downsampling_stage():
    cnn = build_backbone("resnet18", small_stem=True)
    assert cnn.strides == (1, 1, 2, 4, 8)
    assert [f.shape[-1] for f in cnn.features(torch.rand(1, 3, 32, 32))] == [32, 32, 16, 8, 4]
    assert cnn.model.conv1.kernel_size == (3, 3) and cnn.model.conv1.stride == (1, 1)
    with pytest.raises(ValueError, match="small_stem is for CNNs"):
        build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, small_stem=True)
    with pytest.raises(ValueError, match="ResNet-style model with a single conv1"):
        build_backbone("convnext_atto", small_stem=True)


def test_fix_pos_embed_gives_no_prefix_row_to_a_model_whose_class_token_has_no_position():
    vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=8, patch_size=4, depth=1, no_embed_class=True)
    vit.fix_pos_embed()
    assert vit.model.pos_embed.shape == (1, 4, 192) and not vit.model.pos_embed.requires_grad
    torch.testing.assert_close(vit.model.pos_embed[0], sincos_pos_embed((2, 2), 192))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"pos_embed": "none"}, "VisionTransformer has no pos_embed parameter to fix"),
        ({"embed_dim": 66, "num_heads": 3}, "a width divisible by 4, got 66"),
    ],
)
def test_fix_pos_embed_names_what_it_cannot_fix(kwargs, message):
    vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=8, patch_size=4, depth=1, **kwargs)
    with pytest.raises(ValueError, match=message):
        vit.fix_pos_embed()
