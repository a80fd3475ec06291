import pytest
import torch

from masklab.pipeline import Batch, RandomResizedCrop
from masklab.transforms import MASKED, THROWN, AttentionMask, align_maps, amt_refresh_epochs, attention_patch_mask
from masklab.transforms.attention_mask import amt_counts


def test_concentrated_saliency_is_masked_in_nearly_every_draw(device):
    weights = torch.zeros(2000, 8, 8, device=device)
    hot = [3, 10, 27, 45, 60]
    weights.view(2000, -1)[:, hot] = 1.0
    mask = attention_patch_mask(
        weights, ratio=0.25, throw_ratio=0.25, generator=torch.Generator(device=device).manual_seed(0)
    )
    # 16 masked of 64: the 5 hot cells should be among them nearly always.
    hit = mask.masked.flatten(1)[:, hot].float().mean()
    assert hit > 0.99
    assert mask.counts == (32, 16, 16)


def test_uniform_saliency_masks_uniformly(device):
    mask = attention_patch_mask(
        torch.ones(4000, 8, 8, device=device), 0.45, 0.40, torch.Generator(device=device).manual_seed(1)
    )
    masked, thrown = mask.masked.float().mean(0), mask.thrown.float().mean(0)
    # round(64 * .45) = 29 masked, round(64 * .85) - 29 = 25 thrown.
    assert (masked - 29 / 64).abs().max() < 0.04 and (thrown - 25 / 64).abs().max() < 0.04


def test_high_saliency_cells_tend_to_be_masked_the_middle_thrown_the_lowest_kept_visible(device):
    weights = torch.linspace(0, 1, 64, device=device).expand(3000, 64).reshape(3000, 8, 8)
    m = attention_patch_mask(weights, 0.3, 0.3, torch.Generator(device=device).manual_seed(2))
    order = torch.arange(64, device=device)
    mean_masked = (m.masked.flatten(1).float() * order).sum() / m.masked.sum()
    mean_thrown = (m.thrown.flatten(1).float() * order).sum() / m.thrown.sum()
    mean_visible = (m.visible.flatten(1).float() * order).sum() / m.visible.sum()
    assert mean_masked > mean_thrown > mean_visible


def quadrant_map(device):
    # 8x8 saliency over a 32x32 source: ones on the top-left quadrant.
    maps = torch.zeros(1, 8, 8, device=device)
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
def test_alignment_follows_crop_and_flip(box, flip, expected_cols, device):
    aligned = align_maps(
        quadrant_map(device),
        (4, 4),
        torch.tensor([box], dtype=torch.float32, device=device),
        torch.tensor([flip], device=device),
        torch.tensor([[32, 32]], device=device),
    )[0]
    expected = torch.zeros(4, 4, device=device)
    if expected_cols is not None:
        expected[:, expected_cols] = 1
    torch.testing.assert_close(aligned, expected)


def test_stage_uses_the_aligned_cache_after_the_first_refresh(device):
    stage = AttentionMask(num_samples=3, ratio=0.25, throw_ratio=0.25, patch_size=8, grid=(4, 4))
    images = torch.rand(3, 3, 32, 32, device=device)
    batch = RandomResizedCrop(32, scale=None, flip_p=0.0)(
        Batch(images=images, index=torch.tensor([0, 1, 2], device=device), seed=0)
    )
    before = stage(batch).mask
    assert before.counts == (4, 12, 0)  # random at 0.75 until a refresh
    hot = torch.zeros(4, 4, device=device)
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


def refreshed(stage: AttentionMask, maps: torch.Tensor) -> AttentionMask:
    """``stage`` with its cache refreshed to ``maps`` ``(N, Gh, Gw)`` on the patch grid."""
    stage.bind(lambda images, grid: maps[: len(images)])
    stage.refresh(
        [
            Batch(
                images=torch.zeros(len(maps), 3, 1, 1, device=maps.device),
                index=torch.arange(len(maps), device=maps.device),
            )
        ],
        maps.shape[1:],
    )
    return stage


def cell_states(mask, cells: int) -> torch.Tensor:
    """``(B, cells, cells)`` states, after checking every cell's patches share one state."""
    side = mask.grid[0] // cells
    blocks = mask.states.view(mask.batch_size, cells, side, cells, side)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks)), "a cell mixes states"
    return blocks[:, :, 0, :, 0]


def test_simmim_amt_masks_and_throws_whole_cells_with_the_authors_ceil_counts(device):
    # 224 px, 16 px patches, 32 px cells: 49 cells, ceil(49 * .44) = 22 masked, ceil(49 * .26) = 13 thrown.
    stage = AttentionMask(8, 0.44, 0.26, patch_size=16, grid=(14, 14), warmup_ratio=0.44, mask_patch_size=32)
    refreshed(stage, torch.rand(8, 14, 14, generator=torch.Generator(device=device).manual_seed(0), device=device))
    mask = stage(
        Batch(images=torch.zeros(8, 3, 224, 224, device=device), index=torch.arange(8, device=device), seed=3)
    ).mask
    assert mask.grid == (14, 14) and mask.counts == (14 * 4, 22 * 4, 13 * 4)
    states = cell_states(mask, 7).flatten(1)
    assert (states == MASKED).sum(1).tolist() == [22] * 8 and (states == THROWN).sum(1).tolist() == [13] * 8
    assert mask.regrid(7, 7).counts == (14, 22, 13)


def test_cell_saliency_is_the_sum_of_its_patches(device):
    # 2x2 cells of 2x2 patches. Cell (0, 1) has one hot patch (sum 1.0, max 1.0); cell (1, 0) four warm
    # ones (sum 1.2, max 0.3); the rest nothing. One cell masked: P(cell (1, 0)) = 1.2 / 2.2 by sums
    # (0.23 by maxima, 0.5 by centre samples).
    n = 4000
    maps = torch.zeros(n, 4, 4, device=device)
    maps[:, 0, 2] = 1.0
    maps[:, 2:, :2] = 0.3
    stage = AttentionMask(n, 0.25, 0.0, patch_size=4, grid=(4, 4), mask_patch_size=8, epsilon=1e-9)
    refreshed(stage, maps)
    mask = stage(
        Batch(images=torch.zeros(n, 3, 16, 16, device=device), index=torch.arange(n, device=device), seed=0)
    ).mask
    cells = cell_states(mask, 2)
    assert mask.regrid(2, 2).counts == (3, 1, 0)
    share = (cells[:, 1, 0] == MASKED).float().mean()
    assert abs(float(share) - 1.2 / 2.2) < 0.03
    assert bool(((cells[:, 1, 0] == MASKED) | (cells[:, 0, 1] == MASKED)).all())


@pytest.mark.parametrize("flip,hot_cols", [(False, [0, 1]), (True, [2, 3])])
def test_cells_follow_the_crop_and_flip(flip, hot_cols, device):
    # A 16x16 map over a 64 px source, hot left of x = 32. The unscaled crop (16, 0, 48, 32) straddles
    # it: its left half is hot (the right half when flipped), so on its 4x4 cells of 8 px the 8 masked
    # cells are those two columns.
    maps = torch.zeros(2, 16, 16, device=device)
    maps[:, :, :8] = 1
    stage = AttentionMask(2, 0.5, 0.0, patch_size=4, grid=(8, 8), mask_patch_size=8, epsilon=1e-9)
    refreshed(stage, maps)
    batch = Batch(
        images=torch.zeros(2, 3, 32, 32, device=device),
        index=torch.arange(2, device=device),
        crops=torch.tensor([[16.0, 0.0, 48.0, 32.0]] * 2, device=device),
        flips=torch.tensor([flip, flip], device=device),
        source_sizes=torch.tensor([[64, 64]] * 2, device=device),
        seed=0,
    )
    cells = cell_states(stage(batch).mask, 4)
    expected = torch.zeros(2, 4, 4, dtype=torch.uint8, device=device)
    expected[:, :, hot_cols] = MASKED
    assert torch.equal(cells, expected)


def test_warm_up_is_random_at_the_warm_up_ratio(device):
    images = Batch(images=torch.zeros(4000, 3, 8, 8, device=device), index=torch.arange(4000, device=device), seed=0)
    # SimMIM-AMT: random cells at 0.44 on 4x4 cells, ceil(16 * .44) = 8, nothing thrown; each cell equally often.
    cells = AttentionMask(4000, 0.44, 0.26, patch_size=1, warmup_ratio=0.44, mask_patch_size=2)
    states = cell_states(cells(images).mask, 4)
    assert (states == MASKED).flatten(1).sum(1).unique().tolist() == [8] and not (states == THROWN).any()
    assert ((states == MASKED).float().mean(0) - 0.5).abs().max() < 0.04
    # MAE-AMT: random patches at its default 0.75, round(64 * .75) = 48 of 64.
    patches = AttentionMask(8, 0.45, 0.40, patch_size=4)
    assert patches(Batch(images=torch.zeros(8, 3, 32, 32, device=device), seed=0)).mask.counts == (16, 48, 0)
    assert AttentionMask(8, patch_size=4, warmup_ratio=0.3)(
        Batch(images=torch.zeros(2, 3, 32, 32, device=device))
    ).mask.counts == (
        45,
        19,
        0,
    )
    with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\), got 1.0"):
        AttentionMask(4, warmup_ratio=1.0)


def test_amt_counts_and_cell_errors(device):
    assert amt_counts(49, 0.44, 0.26, "ceil") == (22, 13)
    assert amt_counts(49, 0.44, 0.26) == (22, 12)  # round(49 * .70) - 22
    assert amt_counts(196, 0.45, 0.40) == (88, 79)
    with pytest.raises(ValueError, match=r"ask for 25 masked and 25 thrown of 49 cells \(ceil\)"):
        amt_counts(49, 0.5, 0.49, "ceil")
    with pytest.raises(ValueError, match=r"counting must be one of \('round', 'ceil'\), got 'floor'"):
        amt_counts(49, 0.5, 0.2, "floor")
    with pytest.raises(ValueError, match="mask_patch_size=12 must be a positive multiple of patch_size=8"):
        AttentionMask(4, patch_size=8, mask_patch_size=12)
    stage = AttentionMask(4, patch_size=4, mask_patch_size=8)
    with pytest.raises(ValueError, match="image size 36x36 is not divisible by mask_patch_size=8"):
        stage(Batch(images=torch.zeros(1, 3, 36, 36, device=device)))
