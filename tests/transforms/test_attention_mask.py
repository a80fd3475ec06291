import pytest
import torch

from masklab.pipeline import Batch, RandomResizedCrop
from masklab.transforms import AttentionMask, align_maps, amt_refresh_epochs, attention_patch_mask


def test_concentrated_saliency_is_masked_in_nearly_every_draw():
    weights = torch.zeros(2000, 8, 8)
    hot = [3, 10, 27, 45, 60]
    weights.view(2000, -1)[:, hot] = 1.0
    mask = attention_patch_mask(weights, ratio=0.25, throw_ratio=0.25, generator=torch.Generator().manual_seed(0))
    # 16 masked of 64: the 5 hot cells should be among them nearly always.
    hit = mask.masked.flatten(1)[:, hot].float().mean()
    assert hit > 0.99
    assert mask.counts == (32, 16, 16)


def test_uniform_saliency_masks_uniformly():
    mask = attention_patch_mask(torch.ones(4000, 8, 8), 0.45, 0.40, torch.Generator().manual_seed(1))
    masked, thrown = mask.masked.float().mean(0), mask.thrown.float().mean(0)
    # round(64 * .45) = 29 masked, round(64 * .85) - 29 = 25 thrown.
    assert (masked - 29 / 64).abs().max() < 0.04 and (thrown - 25 / 64).abs().max() < 0.04


def test_high_saliency_cells_tend_to_be_masked_the_middle_thrown_the_lowest_kept_visible():
    weights = torch.linspace(0, 1, 64).expand(3000, 64).reshape(3000, 8, 8)
    m = attention_patch_mask(weights, 0.3, 0.3, torch.Generator().manual_seed(2))
    order = torch.arange(64)
    mean_masked = (m.masked.flatten(1).float() * order).sum() / m.masked.sum()
    mean_thrown = (m.thrown.flatten(1).float() * order).sum() / m.thrown.sum()
    mean_visible = (m.visible.flatten(1).float() * order).sum() / m.visible.sum()
    assert mean_masked > mean_thrown > mean_visible


def quadrant_map():
    # 8x8 saliency over a 32x32 source: ones on the top-left quadrant.
    maps = torch.zeros(1, 8, 8)
    maps[0, :4, :4] = 1
    return maps


@pytest.mark.parametrize(
    "box,flip,expected_cols",
    [
        ((0, 0, 16, 16), False, slice(0, 4)),  # the crop is the hot quadrant: all hot
        ((16, 0, 32, 16), False, None),  # top-right quadrant: nothing hot
        ((8, 0, 24, 16), False, slice(0, 2)),  # straddles: hot on its left half
        ((8, 0, 24, 16), True, slice(2, 4)),  # flipped: hot on its right half
    ],
)
def test_alignment_follows_crop_and_flip(box, flip, expected_cols):
    aligned = align_maps(
        quadrant_map(), (4, 4), torch.tensor([box], dtype=torch.float32), torch.tensor([flip]), torch.tensor([[32, 32]])
    )[0]
    expected = torch.zeros(4, 4)
    if expected_cols is not None:
        expected[:, expected_cols] = 1
    torch.testing.assert_close(aligned, expected)


def test_stage_uses_the_aligned_cache_after_the_first_refresh():
    stage = AttentionMask(num_samples=3, ratio=0.25, throw_ratio=0.25, patch_size=8, grid=(4, 4))
    images = torch.rand(3, 3, 32, 32)
    batch = RandomResizedCrop(32, scale=None, flip_p=0.0)(Batch(images=images, index=torch.tensor([0, 1, 2]), seed=0))
    before = stage(batch).mask
    assert before.counts == (4, 12, 0)  # random at 0.75 until a refresh
    hot = torch.zeros(4, 4)
    hot[0, :] = 1  # the top row of every image
    stage.bind(lambda imgs, grid: hot.expand(imgs.shape[0], 4, 4))
    stage.refresh([batch], (4, 4))
    assert stage.active and int(stage.refreshes) == 1
    mask = stage(batch).mask
    assert mask.counts == (8, 4, 4)
    assert mask.masked[:, 0, :].all()


def test_refresh_schedule_and_errors():
    assert amt_refresh_epochs(400) == list(range(40, 400, 40))
    assert amt_refresh_epochs(20, 0.1, 0.25) == [2, 7, 12, 17]
    stage = AttentionMask(num_samples=4)
    assert stage.refresh_due(40, 400) and not stage.refresh_due(41, 400) and not stage.refresh_due(0, 400)
    with pytest.raises(RuntimeError, match="no guide"):
        stage.refresh([], (2, 2))
    with pytest.raises(ValueError, match=r"ratio \+ throw_ratio must be in \[0, 1\), got 1.1"):
        AttentionMask(4, ratio=0.6, throw_ratio=0.5)
