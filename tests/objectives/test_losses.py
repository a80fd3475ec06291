import pytest
import torch

from masklab.objectives import MAE, SimMIM, ViTBackbone, build_backbone, mae_loss, simmim_loss
from masklab.pipeline import Batch
from masklab.transforms import PatchMask


def test_mae_loss_by_hand():
    pred = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])
    # Plain: per-patch MSE (30/4 and 100/4), averaged over the two patches.
    assert mae_loss(pred, target, norm_pix=False).item() == pytest.approx((7.5 + 25.0) / 2)
    # norm_pix: patch 1 -> (x - 2.5) / sqrt(5/3 + eps), MSE 0.75; patch 2 is constant -> 0.
    assert mae_loss(pred, target, norm_pix=True).item() == pytest.approx((0.75 + 0.0) / 2, rel=1e-5)


def test_simmim_loss_by_hand():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, -2.0], [-3.0, -4.0]]]])
    weight = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # Masked pixels (0,0) and (1,1) in both channels: |1| + |4| + |-1| + |-4| over 4 values.
    assert simmim_loss(pred, target, weight).item() == pytest.approx(10 / 4)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"pred \(1, 2, 4\) and target \(1, 3, 4\) differ"):
        mae_loss(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4))


def ternary_mask(batch=2):
    # 4x4 grid: 6 visible, 6 masked, 4 thrown per sample, in different places.
    rows = []
    for b in range(batch):
        states = torch.tensor([0] * 6 + [1] * 6 + [2] * 4)
        rows.append(states[torch.randperm(16, generator=torch.Generator().manual_seed(b))])
    return PatchMask(torch.stack(rows).view(batch, 4, 4))


def _thrown_pixels_changed(images, mask, patch):
    thrown = mask.to_pixels(*images.shape[-2:]).unsqueeze(1) == 2
    return torch.where(thrown, torch.rand_like(images) * 5, images)


def test_mae_objective_equals_the_loss_on_its_own_predictions_and_ignores_thrown_cells():
    torch.manual_seed(0)
    model = MAE(
        ViTBackbone.from_name("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2),
        decoder_dim=32,
        decoder_depth=1,
    )
    images, mask = torch.rand(2, 3, 16, 16), ternary_mask()
    out = model(Batch(images=images, mask=mask))
    pred = model.predict(images, mask)
    assert pred.shape == (2, 6, 48)
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(2, 16, 48)
    target = torch.stack([patches[b, mask.ids_masked[b]] for b in range(2)])
    assert out.loss.item() == pytest.approx(mae_loss(pred, target).item(), rel=1e-6)
    changed = model(Batch(images=_thrown_pixels_changed(images, mask, 4), mask=mask))
    assert changed.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


@pytest.mark.parametrize("name,size", [("vit_tiny_patch16_224", 16), ("resnet18", 32)])
def test_simmim_ignores_thrown_cells(name, size):
    torch.manual_seed(0)
    patch = size // 4
    kwargs = {"depth": 2} if name.startswith("vit") else {}
    model = SimMIM(build_backbone(name, img_size=size, patch_size=patch, **kwargs))
    model.eval()
    images, mask = torch.rand(2, 3, size, size), ternary_mask()
    base = model(Batch(images=images, mask=mask)).loss
    changed = model(Batch(images=_thrown_pixels_changed(images, mask, patch), mask=mask)).loss
    assert changed.item() == pytest.approx(base.item(), rel=1e-5)


def mae_table(gh, gw, dim):
    """MAE's ``get_2d_sincos_pos_embed`` by hand: per cell, sin and cos of the column, then of the row."""
    rows, cols = torch.arange(gh * gw, dtype=torch.float64).div(gw, rounding_mode="floor"), torch.arange(gh * gw) % gw
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y, x = rows[:, None] * omega, cols[:, None].double() * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def test_mae_decoder_positions_are_maes_sine_cosine_table_column_then_row():
    # A 2 x 3 grid: rows and columns differ, so swapped axes would show.
    torch.manual_seed(0)
    vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=(8, 12), patch_size=4, depth=1)
    model = MAE(vit, decoder_dim=8, decoder_depth=1)
    with torch.no_grad():  # the decoder's input is then its positions alone
        model.decoder_embed.weight.zero_()
        model.decoder_embed.bias.zero_()
        model.mask_token.zero_()
    seen = []
    model.decoder.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    mask = PatchMask(torch.tensor([[[0, 1, 2], [1, 0, 0]]]))
    model.predict(torch.rand(1, 3, 8, 12), mask)
    table = mae_table(2, 3, 8)  # (6 cells, 8)
    order = torch.cat([mask.ids_keep[0], mask.ids_masked[0]])  # the thrown cell 2 is in neither
    assert order.tolist() == [0, 4, 5, 1, 3]
    torch.testing.assert_close(seen[0][0, vit.num_prefix :], table[order])


def test_mae_encoder_positions_are_maes_fixed_table_with_a_zero_class_position():
    vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=(8, 12), patch_size=4, depth=1)
    MAE(vit, decoder_dim=8, decoder_depth=1)
    pos = vit.model.pos_embed
    assert not pos.requires_grad
    assert pos.shape == (1, 1 + 6, 192)
    torch.testing.assert_close(pos[0, 0], torch.zeros(192))  # the class token's position
    torch.testing.assert_close(pos[0, 1:], mae_table(2, 3, 192))


def test_mae_can_keep_the_backbones_learned_positions():
    torch.manual_seed(0)
    vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=8, patch_size=4, depth=1)
    before = vit.model.pos_embed.detach().clone()
    MAE(vit, decoder_dim=8, decoder_depth=1, fixed_pos_embed=False)
    assert vit.model.pos_embed.requires_grad
    assert torch.equal(vit.model.pos_embed, before)


def test_mae_decoder_is_built_and_initialised_as_maes():
    torch.manual_seed(0)
    model = MAE(ViTBackbone.from_name("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1), decoder_dim=64)
    for block in model.decoder:
        assert block.attn.qkv.bias is not None  # qkv_bias=True
    linears = [m for part in (model.decoder_embed, model.decoder, model.decoder_pred) for m in part.modules()]
    linears = [m for m in linears if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 + 4 * 2  # embed, pred, and per block qkv, proj, fc1, fc2
    for linear in linears:
        fan_out, fan_in = linear.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier-uniform; PyTorch's default is 1 / sqrt(fan_in)
        assert linear.weight.abs().max() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    norms = [m for part in (model.decoder, model.decoder_norm) for m in part.modules()]
    norms = [m for m in norms if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1  # two per block and the decoder's final norm
    for norm in norms:
        assert norm.eps == 1e-6
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.25)
