import math

import pytest
import torch

from masklab.pipeline import Batch
from masklab.transforms import (
    MASKED,
    HierarchicalMask,
    grid_edges,
    hierarchical_patch_mask,
    region_tree,
    regions_at,
)


def symmetric(batch, cells, seed=0, dtype=torch.float32, device="cpu"):
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(batch, cells, cells, generator=generator, dtype=dtype, device=device)
    return (x + x.transpose(1, 2)) / 2


def two_blocks(grid=(4, 6), inside=1.0, across=0.1, seed=0, device="cpu"):
    """Left and right halves of the grid: strongly tied inside, weakly across, with a little noise."""
    gh, gw = grid
    left = (torch.arange(gh * gw, device=device) % gw) < gw // 2
    same = left[:, None] == left[None, :]
    affinity = torch.where(same, inside, across) + 0.05 * symmetric(1, gh * gw, seed, device=device)[0]
    return affinity.unsqueeze(0), left


def greedy_reference(affinity, grid):
    """The same greedy average-linkage merging, one image, in plain Python."""
    cells = grid[0] * grid[1]
    label = list(range(cells))
    members = {c: {c} for c in range(cells)}
    edges = grid_edges(grid).tolist()
    merges = []
    while len(members) > 1:
        best = None
        for p, q in edges:
            a, b = label[p], label[q]
            if a == b:
                continue
            mean = sum(affinity[i][j] for i in members[a] for j in members[b]) / (len(members[a]) * len(members[b]))
            if best is None or mean > best[0]:
                best = (mean, min(a, b), max(a, b))
        _, kept, gone = best
        members[kept] |= members.pop(gone)
        for c in members[kept]:
            label[c] = kept
        merges.append([kept, gone])
    return merges


def adjacent(cells_a, cells_b, grid):
    gw = grid[1]
    for c in cells_a:
        for d in cells_b:
            if abs(c // gw - d // gw) + abs(c % gw - d % gw) == 1:
                return True
    return False


def test_two_blocks_are_separate_subtrees_and_a_coarse_mask_takes_whole_blocks(device):
    affinity, left = two_blocks(device=device)
    tree = region_tree(affinity, (4, 6))
    for level in range(2, 25):
        for region in tree.labels(level)[0].unique():
            members = tree.labels(level)[0] == region
            assert bool(left[members].all()) or not bool(left[members].any()), f"a region spans both blocks at {level}"
    two = tree.labels(2)[0]
    assert two[left].unique().numel() == 1 and two[~left].unique().numel() == 1
    assert int(tree.merges[0, -1, 0]) == 0 and int(tree.merges[0, -1, 1]) == 3  # the root joins the two blocks
    for seed in range(10):
        mask = hierarchical_patch_mask(two.unsqueeze(0), (4, 6), 0.5, torch.Generator(device=device).manual_seed(seed))
        masked = mask.masked[0].flatten()
        assert torch.equal(masked, left) or torch.equal(masked, ~left)


def test_merges_equal_the_plain_greedy_reference(device):
    for grid in [(3, 4), (5, 5)]:
        affinity = symmetric(3, grid[0] * grid[1], seed=grid[1], dtype=torch.float64, device=device)
        tree = region_tree(affinity, grid)
        for i in range(3):
            assert tree.merges[i].tolist() == greedy_reference(affinity[i].tolist(), grid)


def test_every_merge_joins_adjacent_regions_and_levels_replay_the_merges(device):
    grid = (6, 7)
    tree = region_tree(
        symmetric(4, 42, seed=1, device=device),
        grid,
        tie_break=1e-6,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    assert tree.num_merges == 41 and tree.min_regions == 1
    for i in range(4):
        label = list(range(42))
        for step, (kept, gone) in enumerate(tree.merges[i].tolist()):
            cells_kept = [c for c in range(42) if label[c] == kept]
            cells_gone = [c for c in range(42) if label[c] == gone]
            assert cells_kept and cells_gone and kept < gone
            assert adjacent(cells_kept, cells_gone, grid), f"image {i}, merge {step}"
            label = [kept if x == gone else x for x in label]
            assert tree.labels(42 - step - 1)[i].tolist() == label


def test_a_partial_tree_stops_at_its_level(device):
    affinity = symmetric(2, 16, device=device)
    partial = region_tree(affinity, (4, 4), num_regions=5)
    full = region_tree(affinity, (4, 4))
    assert partial.num_merges == 11 and partial.min_regions == 5
    assert torch.equal(partial.merges, full.merges[:, :11])
    assert torch.equal(partial.labels(5), full.labels(5))
    with pytest.raises(ValueError, match=r"num_regions must be in \[5, 16\] for this tree, got 4"):
        partial.labels(4)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("level", [1, 3, 10, 49])
def test_counts_are_exact_and_whole_regions_are_masked_but_one(ratio, level, device):
    tree = region_tree(symmetric(8, 49, seed=level, device=device), (7, 7))
    regions = tree.labels(level)
    mask = hierarchical_patch_mask(regions, (7, 7), ratio, torch.Generator(device=device).manual_seed(1))
    expected = round(49 * ratio)
    assert mask.counts == (49 - expected, expected, 0)
    assert mask.masked.flatten(1).sum(1).tolist() == [expected] * 8
    for i in range(8):
        masked = mask.masked[i].flatten()
        partial = [
            r for r in regions[i].unique() if 0 < int(masked[regions[i] == r].sum()) < int((regions[i] == r).sum())
        ]
        assert len(partial) <= 1


def test_regions_follow_the_schedule(device):
    assert [regions_at(t, 196) for t in (0.0, 0.25, 1.0)] == [98, 54, 10]  # 196 * (0.5 - 0.45 * sqrt(t))
    assert regions_at(0.25, 196, schedule="linear") == round(196 * (0.5 - 0.45 * 0.25))
    assert regions_at(0.5, 196, schedule="constant") == 98
    assert regions_at(1.0, 4) == 1 and regions_at(-1.0, 196) == 98 and regions_at(2.0, 196) == 10
    stage = HierarchicalMask(0.75, patch_size=4)
    stage.bind(lambda images, grid: symmetric(len(images), 64, seed=3, device=device))
    images = torch.rand(3, 3, 32, 32, device=device)
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        stage.set_progress(t)
        out = stage(Batch(images=images, seed=0))
        expected = round(64 * (0.5 - 0.45 * math.sqrt(t)))
        assert stage.num_regions(64) == expected
        assert [r.unique().numel() for r in out.extras["regions"]] == [expected] * 3
        assert out.mask.num_masked == 48


def test_one_seed_gives_one_mask(device):
    stage = HierarchicalMask(0.6, patch_size=8)
    affinity = symmetric(4, 16, seed=5, device=device)
    stage.bind(lambda images, grid: affinity)
    stage.set_progress(0.3)
    images = torch.rand(4, 3, 32, 32, device=device)
    a, b = stage(Batch(images=images, seed=7)), stage(Batch(images=images, seed=7))
    c = stage(Batch(images=images, seed=8))
    assert torch.equal(a.mask.states, b.mask.states) and torch.equal(a.extras["regions"], b.extras["regions"])
    assert not torch.equal(a.mask.states, c.mask.states)
    assert a.mask.states.max() == MASKED and a.mask.counts == (6, 10, 0)


def test_the_stage_erases_patches_for_supervised_reuse(device):
    stage = HierarchicalMask(0.5, patch_size=8)
    stage.bind(lambda images, grid: symmetric(len(images), 16, device=device))
    erased = stage.erase(
        torch.ones(2, 3, 32, 32, device=device), generator=torch.Generator(device=device).manual_seed(0)
    )
    assert erased.eq(0).flatten(1).float().mean(1).tolist() == [0.5, 0.5]


def test_errors_name_the_bad_value(device):
    with pytest.raises(
        ValueError, match=r"unknown schedule 'cubic'; choose one of \['constant', 'cosine', 'linear', 'sqrt'\]"
    ):
        HierarchicalMask(schedule="cubic")
    with pytest.raises(ValueError, match=r"end_regions must be a fraction of the cells in \(0, 1\], got 0"):
        HierarchicalMask(end_regions=0)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\), got 1.0"):
        HierarchicalMask(ratio=1.0)
    stage = HierarchicalMask(patch_size=8)
    with pytest.raises(RuntimeError, match="HierarchicalMask has no guide"):
        stage(Batch(images=torch.rand(2, 3, 32, 32, device=device)))
    stage.bind(lambda images, grid: torch.rand(2, 64, 64, device=device))
    with pytest.raises(
        ValueError, match=r"affinity of shape \(2, 64, 64\); the 4x4 grid of patch_size=8 needs \(2, 16, 16\)"
    ):
        stage(Batch(images=torch.rand(2, 3, 32, 32, device=device)))
    with pytest.raises(ValueError, match=r"affinity has N=16 cells but the grid 3x5 has 15"):
        region_tree(torch.rand(1, 16, 16, device=device), (3, 5))
    with pytest.raises(TypeError, match="call it on a Batch"):
        stage.sample(2, (32, 32), None, torch.device("cpu"))
