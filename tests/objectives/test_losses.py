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


def test_mae_decoder_positions_are_sine_cosine_of_the_row_then_the_column():
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
    rows, cols = torch.arange(6.0).div(3, rounding_mode="floor"), torch.arange(6.0) % 3
    omega = 1.0 / 10000 ** (torch.arange(2.0) / 2)  # decoder_dim / 4 frequencies
    y, x = rows[:, None] * omega, cols[:, None] * omega
    table = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)  # (6 cells, 8)
    order = torch.cat([mask.ids_keep[0], mask.ids_masked[0]])  # the thrown cell 2 is in neither
    assert order.tolist() == [0, 4, 5, 1, 3]
    torch.testing.assert_close(seen[0][0, vit.num_prefix :], table[order])
