import math

import pytest
import torch

from masklab.pipeline import Batch
from masklab.transforms import (
    MASKS,
    MaskContext,
    MultiBlockMask,
    block_sizes,
    multiblock_cells,
    multiblock_patch_mask,
)


def generator(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("grid,min_keep", [((14, 14), 10), ((8, 8), 8), ((4, 4), 2), ((6, 10), 4)])
@pytest.mark.parametrize("seed", range(4))
def test_exact_counts_are_the_batchs_smallest_draw(grid, min_keep, seed, device):
    # The same seed draws the same blocks in multiblock_cells and in multiblock_patch_mask.
    draw = multiblock_cells(64, grid, min_keep=min_keep, generator=generator(device, seed), device=device)
    mask = multiblock_patch_mask(64, grid, min_keep=min_keep, generator=generator(device, seed), device=device)
    targets, visible = draw.masked.flatten(1).sum(1), draw.visible.flatten(1).sum(1)
    assert mask.counts[:2] == (int(visible.min()), int(targets.min()))
    assert sum(mask.counts) == grid[0] * grid[1] and mask.num_visible >= min_keep and mask.num_masked >= 1
    for state, count in zip((mask.visible, mask.masked, mask.thrown), mask.counts, strict=True):
        assert state.flatten(1).sum(1).tolist() == [count] * 64
    # MASKED cells are target cells, VISIBLE cells context cells outside the targets, the rest THROWN.
    assert not (mask.masked & ~draw.masked).any() and not (mask.visible & ~draw.visible).any()
    assert not (draw.visible & draw.masked).any() and not (draw.visible & ~draw.context).any()


def test_block_sizes_follow_the_papers_rule():
    # floor(196 * 0.2) = 39 cells: a square of round(sqrt(39)) = 6, or at aspect 1.5 round(sqrt(58.5)) x round(sqrt(26)).
    assert block_sizes((14, 14), (0.2, 0.2), (1.0, 1.0)).tolist() == [[6, 6]]
    assert block_sizes((14, 14), (0.2, 0.2), (1.5, 1.5)).tolist() == [[8, 5]]
    assert block_sizes((14, 14), (1.0, 1.0), (1.0, 1.0)).tolist() == [[14, 14]]
    assert block_sizes((4, 4), (0.01, 0.01), (1.0, 1.0)).tolist() == [[1, 1]]  # never empty


def test_target_and_context_geometry_is_ijepas(device):
    sizes = block_sizes((16, 16), (0.15, 0.2), (0.75, 1.5), 20000, generator(device), device).float().cpu()
    h, w = sizes.unbind(1)
    cells = h * w / 256
    # Rounding the sides moves the area and the aspect a little off the drawn ones.
    assert cells.min() >= 0.13 and cells.max() <= 0.22 and cells.mean() == pytest.approx(0.175, abs=0.01)
    assert (h / w).min() >= 0.6 and (h / w).max() <= 1.8
    assert (h > w).float().mean() > 0.5  # aspects 0.75-1.5: more tall blocks than wide ones
    context = block_sizes((16, 16), (0.85, 1.0), (1.0, 1.0), 2000, generator(device), device).cpu()
    assert (context[:, 0] == context[:, 1]).all()
    assert context[:, 0].min() >= math.floor(math.sqrt(0.85 * 256)) and context[:, 0].max() == 16


def test_blocks_are_whole_rectangles_of_one_size_per_batch_anywhere_on_the_grid(device):
    draw = multiblock_cells(512, (14, 14), generator=generator(device, 2), device=device)
    h, w = draw.target_size.tolist()
    assert draw.targets.shape == (512, 4, 14, 14)
    assert draw.targets.flatten(2).sum(2).eq(h * w).all()  # one size for every target of the batch
    top, left = draw.corners[:, :4].unbind(-1)
    rows = draw.targets.any(3).sum(2)
    cols = draw.targets.any(2).sum(2)
    assert rows.eq(h).all() and cols.eq(w).all()  # rectangles: h rows by w columns, h * w cells
    assert int((top + h).max()) == 14 and int((left + w).max()) == 14 and int(top.min()) == 0
    ch, cw = draw.context_size.tolist()
    assert ch == cw and draw.context.flatten(1).sum(1).eq(ch * cw).all()


def test_min_keep_gives_target_cells_back_when_no_context_position_keeps_enough(device):
    # Large targets and a small context leave few free cells: some samples get target cells back.
    kwargs = dict(target_scale=(0.3, 0.3), context_scale=(0.5, 0.5), min_keep=12, tries=2)
    draw = multiblock_cells(256, (8, 8), generator=generator(device, 1), device=device, **kwargs)
    given = draw.given_back > 0
    visible = draw.visible.flatten(1).sum(1)
    assert given.any() and visible[given].eq(12).all() and visible[~given].ge(12).all()
    back = draw.targets.any(1) & draw.visible
    assert back.flatten(1).sum(1).tolist() == draw.given_back.tolist()
    mask = multiblock_patch_mask(256, (8, 8), generator=generator(device, 1), device=device, **kwargs)
    assert mask.num_visible >= 12 and mask.num_masked >= 1


def test_trimming_drops_random_cells_not_the_last_ones(device):
    draw = multiblock_cells(256, (14, 14), generator=generator(device, 4), device=device)
    mask = multiblock_patch_mask(256, (14, 14), generator=generator(device, 4), device=device)
    dropped = (draw.masked & ~mask.masked).flatten(1)
    kept = mask.masked.flatten(1)
    cell = torch.arange(196, device=device)
    first_dropped = torch.where(dropped, cell, 196).amin(1)
    last_kept = torch.where(kept, cell, -1).amax(1)
    # Raster-order trimming (the reference's) would keep only cells before the first dropped one.
    assert (last_kept > first_dropped).float().mean() > 0.5


def test_one_seed_gives_one_mask_and_another_seed_another(device):
    stage = MultiBlockMask(patch_size=4, min_keep=8)
    images = torch.rand(8, 3, 32, 32, device=device)
    first, again, other = (stage(Batch(images=images, seed=s)).mask.states for s in (5, 5, 6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.device == device


def test_options_build_the_stage():
    entry = MASKS["multiblock"]
    assert entry.emits == "patch" and entry.guide is None
    options = entry.section(num_targets=2, target_scale=[0.1, 0.15], context_scale=[0.9, 1.0], min_keep=4)
    stage = entry.build(options, MaskContext(4, 32))
    assert isinstance(stage, MultiBlockMask)
    assert (stage.num_targets, stage.target_scale, stage.min_keep) == (2, (0.1, 0.15), 4)
    assert stage.context_scale == (0.9, 1.0) and stage.patch_size == 4
    assert entry.small(8, 32).min_keep == 2 and entry.small(4, 32).min_keep == 8 and entry.small(16, 224).min_keep == 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_targets": 0}, "num_targets must be a positive integer, got 0"),
        ({"min_keep": 0}, r"min_keep must be a positive integer \(visible cells per sample\), got 0"),
        ({"tries": 0}, "tries must be a positive integer, got 0"),
        (
            {"target_scale": (0.2, 0.15)},
            r"target_scale must be two numbers with 0 < low <= high <= 1, got \(0.2, 0.15\)",
        ),
        (
            {"context_scale": (0.85, 1.2)},
            r"context_scale must be two numbers with 0 < low <= high <= 1, got \(0.85, 1.2\)",
        ),
        ({"target_aspect": (0.0, 1.5)}, r"target_aspect must be two numbers with 0 < low <= high, got \(0.0, 1.5\)"),
        ({"target_scale": (0.2,)}, r"target_scale must be two numbers"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiBlockMask(**kwargs)


def test_a_grid_too_small_for_a_visible_cell_is_refused():
    with pytest.raises(ValueError, match="a 1x1 grid left a sample with 1 target and 0 visible cells"):
        multiblock_patch_mask(2, (1, 1), min_keep=1)
