import pytest
import torch

from masklab.pipeline import Batch
from masklab.transforms import MASKS, AttMask, MaskContext, attmask_patch_mask

pytestmark = pytest.mark.device


def ranked_map(batch, grid=(8, 8), seed=0, device="cpu"):
    """``(B, Gh, Gw)`` saliency with distinct values: a random permutation of 0..N-1 per sample."""
    generator = torch.Generator(device=device).manual_seed(seed)
    cells = grid[0] * grid[1]
    return torch.rand(batch, cells, generator=generator, device=device).argsort(1).float().view(batch, *grid)


def extreme_cells(saliency, k, largest=True):
    flat = saliency.flatten(1)
    return torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(k, dim=1, largest=largest).indices, True)


@pytest.mark.parametrize("mode", ["high", "low"])
def test_high_and_low_mask_exactly_the_most_and_least_attended_cells(mode, device):
    saliency = ranked_map(6, device=device)
    mask = attmask_patch_mask(saliency, 0.75, mode, generator=torch.Generator(device=device).manual_seed(0))
    assert mask.counts == (16, 48, 0) and mask.masked.flatten(1).sum(1).tolist() == [48] * 6
    assert torch.equal(mask.masked.flatten(1), extreme_cells(saliency, 48, largest=mode == "high"))


def test_hint_reveals_a_random_share_of_the_most_attended_from_the_top_of_all_cells(device):
    # 8x8, ratio 0.5: the 32 most attended; hint 0.25 reveals 8 of them, drawn from the 16 most attended of
    # all cells (hint_pool 0.25): cells 17-32 by rank always masked, the top 16 masked half the time.
    saliency = ranked_map(1, device=device).expand(4000, -1, -1)
    g = torch.Generator(device=device).manual_seed(0)
    mask = attmask_patch_mask(saliency, 0.5, "hint", 0.25, g, hint_pool=0.25)
    top, pool = extreme_cells(saliency[:1], 32)[0], extreme_cells(saliency[:1], 16)[0]
    assert mask.counts == (40, 24, 0) and mask.masked.flatten(1).sum(1).tolist() == [24] * 4000
    frequency = mask.masked.float().mean(0).flatten()
    assert bool((frequency[~top] == 0).all())  # never outside the attended set
    assert bool((frequency[top & ~pool] == 1).all())  # hints only from the pool
    assert torch.allclose(frequency[pool], torch.full_like(frequency[pool], 0.5), atol=0.04)  # uniform there
    # The authors' defaults on the study's grid: 48 chosen, 5 hints from the 6 most attended cells.
    default = attmask_patch_mask(saliency[:1], 0.75, "hint", 0.1, g)
    assert default.counts == (21, 43, 0)
    assert bool(
        default.masked.flatten(1)[0][extreme_cells(saliency[:1], 48)[0] & ~extreme_cells(saliency[:1], 6)[0]].all()
    )


def test_equal_saliency_is_broken_at_random(device):
    mask = attmask_patch_mask(torch.zeros(256, 8, 8, device=device), 0.5, "high", 0.1, torch.Generator(device=device))
    frequency = mask.masked.float().mean(0).flatten()
    assert bool((frequency > 0.3).all()) and bool((frequency < 0.7).all())  # no positional bias


def test_the_stage_reads_its_guide_on_the_batch_images_without_grad_and_one_seed_gives_one_mask(device):
    seen = []

    def guide(images, grid):
        seen.append((images, torch.is_grad_enabled(), grid))
        return images.mean(1).unflatten(1, (grid[0], 4)).unflatten(3, (grid[1], 4)).mean((2, 4))

    stage = AttMask(0.5, patch_size=4, mode="high")
    stage.bind(guide)
    images = torch.rand(4, 3, 32, 32, device=device)
    first, again = (stage(Batch(images=images, seed=5)).mask for _ in range(2))
    assert torch.equal(first.states, again.states) and first.counts == (32, 32, 0)
    assert seen[0][0] is images and seen[0][1] is False and seen[0][2] == (8, 8)
    brightness = images.mean(1).unflatten(1, (8, 4)).unflatten(3, (8, 4)).mean((2, 4))
    assert torch.equal(first.masked.flatten(1), extreme_cells(brightness, 32))  # the brightest cells


def test_an_unbound_stage_says_what_binds_it():
    with pytest.raises(RuntimeError, match=r"stage.bind\(objective.guidance\('saliency'\)\)"):
        AttMask(patch_size=4)(Batch(images=torch.rand(2, 3, 32, 32), seed=0))


def test_the_registry_entry_builds_the_defaults_and_needs_saliency():
    entry = MASKS["attmask"]
    assert entry.guide == "saliency" and entry.emits == "patch" and set(entry.families) == {"vit", "cnn"}
    stage = entry.build(entry.section(), MaskContext(patch_size=4, image_size=32))
    assert (stage.ratio, stage.mode, stage.hint, stage.hint_pool, stage.patch_size) == (0.5, "hint", 0.1, 0.1, 4)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"mode must be one of \('high', 'hint', 'low'\), got 'middle'"):
        AttMask(mode="middle")
    with pytest.raises(ValueError, match=r"hint must be a share of the masked cells in \[0, 1\], got 1.5"):
        AttMask(hint=1.5)
    with pytest.raises(ValueError, match=r"hint_pool must be a share of the cells in \[0, 1\], got -0.1"):
        AttMask(hint_pool=-0.1)
    with pytest.raises(ValueError, match="saliency must be"):
        attmask_patch_mask(torch.zeros(8, 8))


def cells_stage(saliency, **options):
    """AttMask on SimMIM's cells at 32 px (4 px patches, 8 px cells: 4x4 cells of 2x2 patches), its guide
    returning ``saliency`` ``(B, 8, 8)`` on the patch grid."""
    stage = AttMask(patch_size=4, mask_patch_size=8, **options)
    stage.bind(lambda images, grid: saliency)
    return stage


def cell_states(mask):
    """``(B, 4, 4)`` cell states of an 8x8 patch mask, after checking each cell's 2x2 patches share one state."""
    blocks = mask.states.view(mask.batch_size, 4, 2, 4, 2)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    return blocks[:, :, 0, :, 0]


@pytest.mark.parametrize(
    "options,chosen,masked",
    [
        # round(16 * 0.6) = 10 cells chosen; round(10 * 0.1) = 1 revealed, of the round(16 * 0.1) = 2 most attended.
        (dict(ratio=0.6, mode="hint"), 10, 9),
        # round(16 * 0.5) = 8 chosen; round(8 * 0.25) = 2 revealed, of the round(16 * 0.25) = 4 most attended.
        (dict(ratio=0.5, mode="hint", hint=0.25, hint_pool=0.25), 8, 6),
        (dict(ratio=0.75, mode="high"), 12, 12),
        (dict(ratio=0.25, mode="low"), 4, 4),
    ],
)
def test_on_simmims_cells_whole_cells_are_masked_with_exact_counts_in_cells(options, chosen, masked, device):
    saliency = torch.rand(6, 8, 8, generator=torch.Generator(device=device).manual_seed(0), device=device)
    images = torch.rand(6, 3, 32, 32, device=device)
    mask = cells_stage(saliency, **options)(Batch(images=images, seed=3)).mask
    assert mask.grid == (8, 8) and mask.counts == (4 * (16 - masked), 4 * masked, 0)
    cells = cell_states(mask)
    assert cells.flatten(1).eq(1).sum(1).tolist() == [masked] * 6  # MASKED is 1
    assert mask.regrid(4, 4).counts == (16 - masked, masked, 0)


def test_high_on_cells_masks_the_cells_whose_summed_saliency_is_highest(device):
    # A hand-made 8x8 saliency: five cells (2x2 patches each) carry it. By their sums the top four are
    # (2, 3): 12, (3, 0): 11, (1, 1): 10, (0, 0): 9; (3, 3) sums 8 though its patch 8 is the second-hottest,
    # and (1, 1)'s hottest patch (2.5) is the coolest of the five: a per-patch maximum would choose otherwise.
    saliency = torch.zeros(1, 8, 8, device=device)
    saliency[0, 0, 0] = 9.0  # cell (0, 0): one hot patch
    saliency[0, 2:4, 2:4] = 2.5  # cell (1, 1): four warm patches
    saliency[0, 4:6, 6:8] = torch.tensor([[4.0, 4.0], [4.0, 0.0]])  # cell (2, 3)
    saliency[0, 6, 0:2] = torch.tensor([5.0, 6.0])  # cell (3, 0)
    saliency[0, 7, 7] = 8.0  # cell (3, 3)
    images = torch.rand(1, 3, 32, 32, device=device)  # the guide reads the images on their device
    mask = cells_stage(saliency, ratio=0.25, mode="high")(Batch(images=images, seed=0)).mask
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[[2, 3, 1, 0], [3, 0, 1, 0]] = True
    assert torch.equal(cell_states(mask)[0].eq(1).cpu(), expected)
    assert mask.counts == (48, 16, 0)


def test_hints_on_cells_come_from_the_most_attended_cells_by_summed_saliency(device):
    # 4x4 cells whose sums rank them 0..15 (the patches of a cell share it): ratio 0.5 chooses the 8 top cells,
    # hint 0.25 reveals 2, drawn from the 4 top cells (hint_pool 0.25): cells ranked 5-8 always masked.
    rank = torch.randperm(16, generator=torch.Generator().manual_seed(2)).float().view(1, 4, 4).to(device)
    saliency = rank.repeat_interleave(2, 1).repeat_interleave(2, 2).expand(2000, -1, -1)
    stage = cells_stage(saliency, ratio=0.5, mode="hint", hint=0.25, hint_pool=0.25)
    mask = stage(Batch(images=torch.zeros(2000, 3, 32, 32, device=device), seed=0)).mask
    frequency = cell_states(mask).eq(1).float().mean(0).flatten().cpu()
    rank = rank.flatten().cpu()
    assert bool((frequency[rank < 8] == 0).all()) and bool((frequency[(rank >= 8) & (rank < 12)] == 1).all())
    assert torch.allclose(frequency[rank >= 12], torch.full((4,), 0.5), atol=0.05)


def test_on_cells_one_batch_seed_gives_one_mask_and_single_patch_cells_are_the_default_draw(device):
    # 64 samples: each reveals 1 of its 2 most attended cells, so two seeds draw alike with odds 2**-64 (with 4
    # samples, 1 in 16: CUDA's stream drew seeds 7 and 8 alike).
    saliency = torch.rand(64, 8, 8, generator=torch.Generator(device=device).manual_seed(1), device=device)
    images = torch.rand(64, 3, 32, 32, device=device)
    stage = cells_stage(saliency, ratio=0.6, mode="hint")
    first, again, other = (stage(Batch(images=images, seed=s)).mask for s in (7, 7, 8))
    assert torch.equal(first.states, again.states) and not torch.equal(first.states, other.states)
    # Cells of one patch are the patches: the draw is the option-less stage's, bit for bit.
    single, default = AttMask(0.6, patch_size=4, mask_patch_size=4), AttMask(0.6, patch_size=4)
    for stage in (single, default):
        stage.bind(lambda images, grid: saliency)
    assert torch.equal(
        single(Batch(images=images, seed=7)).mask.states, default(Batch(images=images, seed=7)).mask.states
    )


def test_bad_mask_patch_size_errors_name_the_value():
    with pytest.raises(ValueError, match=r"mask_patch_size=6 must be a positive multiple of patch_size=4 \(or None"):
        AttMask(patch_size=4, mask_patch_size=6)
    with pytest.raises(ValueError, match=r"mask_patch_size=0 must be a positive multiple of patch_size=4"):
        AttMask(patch_size=4, mask_patch_size=0)
    stage = cells_stage(torch.rand(2, 9, 9))
    with pytest.raises(ValueError, match=r"image size 36x36 is not divisible by mask_patch_size=8"):
        stage(Batch(images=torch.rand(2, 3, 36, 36), seed=0))


def test_the_simmim_attmask_recipe_masks_simmims_cells_at_simmims_ratio():
    from masklab.recipes.build import mask_stages
    from masklab.recipes.config import load_config

    entry = MASKS["attmask"]
    assert entry.coarse_cell == "mask_patch_size"
    (attmask,) = mask_stages(load_config("simmim_attmask"), "vit", num_samples=8)
    (simmim,) = mask_stages(load_config("simmim"), "vit", num_samples=8)
    assert isinstance(attmask, AttMask) and load_config("simmim_attmask").objective.name == "simmim"
    assert (attmask.mask_patch_size, attmask.patch_size, attmask.ratio) == (
        simmim.mask_patch_size,
        simmim.patch_size,
        simmim.ratio,
    )
    assert (attmask.mode, attmask.hint, attmask.hint_pool) == ("hint", 0.1, 0.1)
    # The CLI checks, before the loader starts, that the cells tile the image (the registry's coarse_cell).
    with pytest.raises(ValueError, match=r"data.resolution=36 is not divisible by mask.mask_patch_size=8"):
        mask_stages(load_config("simmim_attmask", ["data.resolution=36"]), "vit", num_samples=8)
