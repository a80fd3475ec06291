import math

import pytest
import torch

from masklab.pipeline import Batch, Chain
from masklab.transforms import (
    MASKED,
    THROWN,
    VISIBLE,
    BlockMask,
    FeatureMask,
    MixMask,
    PatchMask,
    RandomMask,
    SimMIMMask,
    block_cells,
    feature_masks,
    mix_images,
    mix_targets,
    mixmask_params,
    random_patch_mask,
)


def batch(device, n=8, size=32, seed=0, dtype=torch.float32):
    return Batch(images=torch.rand(n, 3, size, size, dtype=dtype, device=device), seed=seed)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.4, 0.5, 0.75, 0.9])
@pytest.mark.parametrize(
    "make,patch,cells",
    [
        (lambda r: RandomMask(r, patch_size=4), 4, 64),
        (lambda r: BlockMask(r, patch_size=4), 4, 64),
        (lambda r: BlockMask(r, patch_size=2, min_cells=16), 2, 256),
        (lambda r: SimMIMMask(r, mask_patch_size=8, patch_size=4), 4, 64),
    ],
    ids=["random", "block", "block-min16", "simmim"],
)
def test_exact_counts_in_every_sample(make, patch, cells, ratio, device):
    out = make(ratio)(batch(device, n=16))
    mask = out.mask
    assert isinstance(mask, PatchMask)
    per_sample = mask.masked.flatten(1).sum(1)
    # SimMIM rounds its 16 coarse cells up (its reference code's ceil), the others round.
    expected = math.ceil(16 * ratio) * 4 if isinstance(make(ratio), SimMIMMask) else round(cells * ratio)
    assert per_sample.tolist() == [expected] * 16
    assert mask.counts == (cells - expected, expected, 0)


def test_simmim_mask_throws_whole_random_cells_with_simmim_amts_rounded_up_counts(device):
    # AMT's control on SimMIM's cells: at 32 px, 8 px cells, 16 cells: ceil(7.04) = 8 masked, ceil(4.16) = 5 thrown.
    out = SimMIMMask(0.44, mask_patch_size=8, patch_size=4, throw_ratio=0.26)(batch(device, n=64))
    assert out.mask.counts == (12, 32, 20)  # on the 8x8 patch grid: 4 patches a cell
    cells = out.mask.states.view(64, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).flatten(3)  # (B, 4, 4, 4 patches)
    assert (cells == cells[..., :1]).all()  # every patch of a cell in its cell's state
    per_cell = torch.stack([(cells[..., 0] == state).flatten(1).sum(1) for state in (VISIBLE, MASKED, THROWN)], 1)
    assert per_cell.tolist() == [[3, 8, 5]] * 64
    assert (cells[..., 0] == THROWN).float().mean(0).min() > 0  # thrown cells fall anywhere
    with pytest.raises(ValueError, match="ratio=0.6 and throw_ratio=0.4 leave no cell visible"):
        SimMIMMask(0.6, 8, 4, throw_ratio=0.4)
    with pytest.raises(ValueError, match="mask 8 and throw 9 of 16 cells"):
        SimMIMMask(0.44, 8, 4, throw_ratio=0.53)(batch(device))


def test_random_mask_masks_each_cell_about_equally_often(device):
    g = torch.Generator(device=device).manual_seed(0)
    draws = 4000
    freq = random_patch_mask(draws, (8, 8), 0.75, g, device).masked.float().mean(0)
    # Binomial(4000, 0.75): sd 0.0068; 5 sd either way.
    assert (freq - 0.75).abs().max() < 0.035


def test_block_sizes_and_aspects_within_bounds(device):
    g = torch.Generator(device=device).manual_seed(0)
    draw = block_cells(512, (14, 14), 78, min_cells=4, aspect=(0.3, 1 / 0.3), generator=g, device=device)
    top, left, h, w = draw.blocks[draw.accepted].unbind(1)
    assert len(h) > 512  # most samples place several whole blocks
    assert (h * w >= 4).all()
    assert ((h / w >= 0.3 - 1e-6) & (h / w <= 1 / 0.3 + 1e-6)).all()
    assert ((top >= 0) & (left >= 0) & (top + h <= 14) & (left + w <= 14)).all()
    assert draw.cells.flatten(1).sum(1).eq(78).all()
    # Blocks, not scattered cells: nearly every masked cell lies in a placed block.
    assert draw.from_blocks.float().mean() > 0.97 * 78


def test_block_cells_honours_per_sample_counts(device):
    counts = torch.tensor([0, 1, 5, 40, 63], device=device)
    cells = block_cells(5, (8, 8), counts, generator=torch.Generator(device=device).manual_seed(1), device=device).cells
    assert cells.flatten(1).sum(1).tolist() == counts.tolist()


@pytest.mark.parametrize(
    "stage", [RandomMask(0.5, 4), BlockMask(0.5, 4), SimMIMMask(0.5, 8, 4), MixMask(4), FeatureMask((4, 8), 0.5, 2)]
)
def test_one_seed_gives_one_mask_and_another_seed_another(stage, device):
    def key(out):
        if out.mask is not None:
            return out.mask.states
        if out.mix is not None:
            return out.mix["own"]
        return out.extras["feature_masks"].masks[0]

    a, b, c = stage(batch(device, seed=3)), stage(batch(device, seed=3)), stage(batch(device, seed=4))
    assert torch.equal(key(a), key(b))
    assert not torch.equal(key(a), key(c))


def test_stages_do_not_mutate_and_follow_device_and_dtype(device):
    b = batch(device, dtype=torch.float64)
    before = b.images.clone()
    out = Chain([RandomMask(0.5, 4), MixMask(4), FeatureMask((8, 16), 0.5, 2)])(b)
    assert torch.equal(b.images, before) and b.mask is None and b.mix is None
    assert out.mask.device == b.images.device
    assert out.mix["images"].dtype == torch.float64 and out.mix["images"].device == b.images.device
    assert out.extras["feature_masks"].masks[0].device == b.images.device


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("partner", ["reverse", "permute"])
def test_mixmask_lambda_partner_and_inverse(partner, per_sample, device):
    b = batch(device, n=6, size=32, seed=2)
    out = MixMask(grid=4, ratio=0.5, partner=partner, per_sample=per_sample)(b)
    mix = out.mix
    own, lam, p, inv = mix["own"], mix["lam"], mix["partner"], mix["inverse"]
    assert torch.allclose(lam, own.mean(dim=(1, 2, 3)))
    assert torch.allclose(lam, torch.full((6,), 0.5, device=device))
    assert sorted(p.tolist()) == list(range(6))
    assert torch.equal(inv[p], torch.arange(6, device=device)) and torch.equal(p[inv], torch.arange(6, device=device))
    if partner == "reverse":
        assert p.tolist() == [5, 4, 3, 2, 1, 0]
    expected = own * b.images + (1 - own) * b.images[p]
    assert torch.allclose(mix["images"], expected)
    # The own region is whole 8x8 cells of the 4x4 layout.
    assert torch.equal(own[:, :, ::8, ::8].repeat_interleave(8, 2).repeat_interleave(8, 3), own)
    if not per_sample:
        assert (own == own[:1]).all()


@pytest.mark.parametrize("grid,ratio,own_cells", [(8, 0.5, 32), (8, 0.3, 45), (4, 0.5, 8), (4, 0.75, 4)])
@pytest.mark.parametrize("per_sample", [True, False])
def test_mixmask_own_region_is_the_block_samplers_draw(grid, ratio, own_cells, per_sample, device):
    # The blocks (of at least 4 cells, BEiT's) are the image's own region, as in the authors' code; the
    # partner fills the rest. Own cells = grid^2 - round(grid^2 * ratio), so lam is exact.
    n, size = 6, 8 * grid
    params = mixmask_params(
        n,
        (size, size),
        grid,
        ratio,
        per_sample=per_sample,
        generator=torch.Generator(device=device).manual_seed(4),
        device=device,
    )
    draws = n if per_sample else 1
    blocks = block_cells(
        draws,
        (grid, grid),
        own_cells,
        min_cells=4,
        generator=torch.Generator(device=device).manual_seed(4),
        device=device,
    )
    own_cells_drawn = params.own[:, 0, ::8, ::8].bool()
    assert torch.equal(own_cells_drawn, blocks.cells.expand(n, -1, -1))
    assert torch.equal(params.own, own_cells_drawn.float().repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None])
    assert params.lam.tolist() == [own_cells / grid**2] * n
    images = torch.rand(n, 3, size, size, device=device)
    mixed = mix_images(images, params)
    for i in range(n):
        j = int(params.partner[i])
        for r, c in ((0, 0), (grid - 1, grid - 1), (grid // 2, 1)):
            cell = (slice(None), slice(8 * r, 8 * r + 8), slice(8 * c, 8 * c + 8))
            source = images[i] if own_cells_drawn[i, r, c] else images[j]
            assert torch.equal(mixed[i][cell], source[cell])


@pytest.mark.parametrize(
    "grid,ratio,min_cells,match",
    [
        (4, 0.9, 4, r"ratio=0.9 leaves 2 own cells of the 16 of a 4x4 mix grid, fewer than min_cells=4"),
        (2, 0.5, 4, r"ratio=0.5 leaves 2 own cells of the 4 of a 2x2 mix grid, fewer than min_cells=4"),
        (4, 0.99, 1, r"ratio=0.99 fills 16 of the 16 cells of a 4x4 mix grid, leaving 0 own"),
        (8, 0.005, 4, r"ratio=0.005 fills 0 of the 64 cells of a 8x8 mix grid, leaving 64 own"),
        (4, 0.5, 0, r"min_cells must be at least 1, got 0"),
        (0, 0.5, 4, r"grid must be positive, got 0"),
    ],
)
def test_mixmask_combinations_that_cannot_be_drawn_are_refused(grid, ratio, min_cells, match):
    with pytest.raises(ValueError, match=match):
        MixMask(grid=grid, ratio=ratio, min_cells=min_cells)
    with pytest.raises(ValueError, match=match):
        mixmask_params(2, (32, 32), grid, ratio, min_cells=min_cells)


def test_mixmask_min_cells_is_an_option(device):
    from masklab.transforms import MASKS, MaskContext

    entry = MASKS["mixmask"]
    stage = entry.build(entry.section(ratio=0.5, grid=4, min_cells=2), MaskContext(patch_size=4, image_size=32))
    assert stage.min_cells == 2 and entry.build(entry.small(4, 32), MaskContext(4, 32)).min_cells == 4
    params = stage.draw(torch.zeros(3, 3, 32, 32, device=device), torch.Generator(device=device).manual_seed(1))
    expected = block_cells(
        3, (4, 4), 8, min_cells=2, generator=torch.Generator(device=device).manual_seed(1), device=device
    ).cells
    assert torch.equal(params.own[:, 0, ::8, ::8].bool(), expected)


def test_mixmask_mixes_the_query_view_and_leaves_the_key_clean(device):
    b = batch(device, n=4).replace(
        views=[torch.rand(4, 3, 32, 32, device=device), torch.rand(4, 3, 32, 32, device=device)]
    )
    out = MixMask(grid=4, view=0)(b)
    own, p = out.mix["own"], out.mix["partner"]
    assert torch.allclose(out.mix["images"], own * b.views[0] + (1 - own) * b.views[0][p])
    assert out.views[1] is b.views[1]


def test_mix_targets_are_lambda_weighted(device):
    params = mixmask_params(
        4,
        (16, 16),
        grid=4,
        ratio=0.25,
        partner="permute",
        generator=torch.Generator(device=device).manual_seed(0),
        device=device,
    )
    y = torch.tensor([0, 1, 2, 1], device=device)
    soft = mix_targets(y, params, num_classes=3)
    for i in range(4):
        expected = torch.zeros(3, device=device)
        expected[y[i]] += params.lam[i]
        expected[y[params.partner[i]]] += 1 - params.lam[i]
        assert torch.allclose(soft[i], expected)
    assert torch.allclose(soft.sum(1), torch.ones(4, device=device))
    with pytest.raises(ValueError, match="num_classes"):
        mix_targets(y, params)


def test_feature_masks_are_nested(device):
    fm = feature_masks(
        3,
        (64, 64),
        strides=(8, 16, 32),
        ratio=0.5,
        groups=4,
        generator=torch.Generator(device=device).manual_seed(0),
        device=device,
    )
    m8, m16, m32 = fm[8], fm[16], fm[32]
    assert m8.shape == (3, 4, 8, 8) and m16.shape == (3, 4, 4, 4) and m32.shape == (3, 4, 2, 2)
    assert m32.flatten(2).sum(2).eq(2).all()
    assert torch.equal(m16, m32.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.equal(m8, m16.repeat_interleave(2, 2).repeat_interleave(2, 3))
    # Groups differ from each other.
    assert not all(torch.equal(m32[:, 0], m32[:, g]) for g in range(1, 4))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: RandomMask(1.0), r"ratio must be in \[0, 1\), got 1.0"),
        (lambda: RandomMask(-0.1), r"got -0.1"),
        (lambda: BlockMask(1.2), r"got 1.2"),
        (lambda: BlockMask(0.5, min_cells=0), r"min_cells must be at least 1, got 0"),
        (lambda: BlockMask(0.5, aspect=(2, 1)), r"aspect .* got \(2, 1\)"),
        (
            lambda: SimMIMMask(0.6, mask_patch_size=30, patch_size=16),
            r"mask_patch_size=30 must be a positive multiple of patch_size=16",
        ),
        (lambda: MixMask(ratio=0.0), r"ratio must be in \(0, 1\), got 0.0"),
        (lambda: MixMask(partner="shuffle"), r"partner must be one of .* got 'shuffle'"),
        (lambda: FeatureMask(ratio=1.5), r"got 1.5"),
        (lambda: FeatureMask(groups=0), r"groups must be positive, got 0"),
    ],
)
def test_bad_arguments_raise_naming_the_value(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "stage,size,match",
    [
        (RandomMask(0.5, patch_size=16), 40, r"40x40 is not divisible by patch_size=16"),
        (BlockMask(0.5, patch_size=6), 32, r"32x32 is not divisible by patch_size=6"),
        (SimMIMMask(0.5, mask_patch_size=32, patch_size=8), 48, r"48x48 is not divisible by mask_patch_size=32"),
        (MixMask(grid=5), 32, r"32x32 is not divisible by the 5x5 mix grid"),
        (FeatureMask(strides=(8, 16, 32)), 48, r"48x48 is not divisible by the largest stride=32"),
    ],
)
def test_grid_mismatch_raises_naming_the_size(stage, size, match, device):
    with pytest.raises(ValueError, match=match):
        stage(batch(device, size=size))


def test_feature_mask_strides_must_nest():
    with pytest.raises(ValueError, match=r"each stride must divide the next, got \(8, 12\)"):
        feature_masks(1, (48, 48), strides=(8, 12))


def test_erase_and_mix_for_supervised_loops(device):
    x = torch.rand(4, 3, 32, 32, device=device)
    erased = BlockMask(0.5, patch_size=8).erase(x, fill=0.0, generator=torch.Generator(device=device).manual_seed(0))
    assert math.isclose(float((erased == 0).all(1).float().mean()), 0.5, abs_tol=1e-6)
    mixed, soft = MixMask(grid=4).mix(x, torch.tensor([0, 1, 2, 3], device=device), num_classes=4)
    assert mixed.shape == x.shape and soft.shape == (4, 4)
    assert torch.allclose(soft.sum(1), torch.ones(4, device=device))


def test_bit_field_and_bool_block_paths_agree(monkeypatch, device):
    import masklab.transforms.block_mask as block_mask

    fast = block_cells(32, (14, 14), 78, generator=torch.Generator(device=device).manual_seed(5), device=device)
    monkeypatch.setattr(block_mask, "_MAX_BIT_WIDTH", 0)
    slow = block_cells(32, (14, 14), 78, generator=torch.Generator(device=device).manual_seed(5), device=device)
    assert torch.equal(fast.cells, slow.cells) and torch.equal(fast.from_blocks, slow.from_blocks)


def test_wide_grids_take_the_bool_path_with_exact_counts(device):
    draw = block_cells(4, (3, 70), 100, generator=torch.Generator(device=device).manual_seed(0), device=device)
    assert draw.cells.flatten(1).sum(1).tolist() == [100] * 4


def test_random_throwing_counts_are_amts(device):
    out = RandomMask(0.45, patch_size=16, throw_ratio=0.40)(batch(device, n=6, size=224))
    m = out.mask
    # N = 196: round(196 * 0.45) = 88 masked, round(196 * 0.85) - 88 = 79 thrown.
    assert m.counts == (29, 88, 79)
    assert m.masked.flatten(1).sum(1).eq(88).all() and m.thrown.flatten(1).sum(1).eq(79).all()
    with pytest.raises(ValueError, match=r"ratio \+ throw_ratio must be in \[0, 1\), got 1.05"):
        RandomMask(0.75, throw_ratio=0.3)


def test_mask_from_scores_ranks_masked_then_thrown(device):
    from masklab.transforms import mask_from_scores

    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7]], device=device)
    m = mask_from_scores(scores, (2, 2), num_masked=1, num_thrown=2)
    assert m.states.flatten().tolist() == [1, 0, 2, 2]
