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
