import pytest
import torch

from masklab.pipeline import Batch
from masklab.transforms import MASKS, HardPatchMask, MaskContext, hard_fraction_at, hard_patch_mask


def ranked_map(batch, grid=(8, 8), seed=0, device="cpu"):
    """``(B, Gh, Gw)`` difficulty with distinct values: a random permutation of 0..N-1 per sample."""
    generator = torch.Generator(device=device).manual_seed(seed)
    cells = grid[0] * grid[1]
    return torch.rand(batch, cells, generator=generator, device=device).argsort(1).float().view(batch, *grid)


def top_cells_of(difficulty, k):
    flat = difficulty.flatten(1)
    return torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(k, dim=1).indices, True)


@pytest.mark.parametrize("progress,hard", [(0.0, 0), (0.5, 12), (1.0, 24)])
def test_counts_are_exact_and_the_hardest_cells_follow_the_schedule(progress, hard, device):
    # 8x8 grid, ratio 0.75: 48 masked; alpha_t = 0.5 t of them chosen as the hardest (0, 12, 24).
    difficulty = ranked_map(6, device=device)
    stage = HardPatchMask(0.75, patch_size=4)
    stage.bind(lambda images, grid: difficulty)
    stage.set_progress(progress)
    out = stage(Batch(images=torch.rand(6, 3, 32, 32, device=device), seed=3))
    mask, chosen = out.mask, out.extras["hard"].flatten(1)
    assert mask.counts == (16, 48, 0) and mask.states.device == difficulty.device
    assert mask.masked.flatten(1).sum(1).tolist() == [48] * 6  # counted, not trusted
    assert stage.hard_fraction() == pytest.approx(0.5 * progress) and stage.hard_count(64) == hard
    assert chosen.sum(1).tolist() == [hard] * 6
    assert torch.equal(chosen, top_cells_of(difficulty, hard)) if hard else not chosen.any()
    assert not (chosen & ~mask.masked.flatten(1)).any()


def test_the_rest_of_the_masked_cells_are_uniform_over_the_easier_cells(device):
    # One fixed map; at progress 1, 24 hardest cells always masked, the other 24 of the 40 easier cells at random.
    difficulty = ranked_map(1, device=device).expand(4000, -1, -1)
    mask, hard = hard_patch_mask(difficulty, 0.75, 0.5, torch.Generator(device=device).manual_seed(0))
    hard, masked = hard[0].flatten(), mask.masked.float().mean(0).flatten()
    assert torch.equal(top_cells_of(difficulty[:1], 24)[0], hard)
    assert bool((masked[hard] == 1).all())
    assert torch.allclose(masked[~hard], torch.full_like(masked[~hard], 24 / 40), atol=0.04)


def test_equal_difficulties_are_broken_at_random(device):
    flat = torch.zeros(64, 8, 8, device=device)
    _, hard = hard_patch_mask(flat, 0.75, 0.5, torch.Generator(device=device).manual_seed(0))
    frequency = hard.float().mean(0).flatten()
    assert hard.flatten(1).sum(1).tolist() == [24] * 64
    assert bool((frequency > 0).all()) and bool((frequency < 1).all())  # no cell always or never picked


def test_one_seed_gives_one_mask_and_the_guide_sees_the_batch_images(device):
    seen = []

    def guide(images, grid):
        seen.append(images)
        return images.mean(1).unflatten(1, (grid[0], 4)).unflatten(3, (grid[1], 4)).mean((2, 4))

    stage = HardPatchMask(0.6, patch_size=4, start_hard=0.3, end_hard=0.9)
    stage.bind(guide)
    stage.set_progress(0.25)
    images = torch.rand(3, 3, 32, 32, device=device)
    first, again, other = (stage(Batch(images=images, seed=s)) for s in (7, 7, 8))
    assert torch.equal(first.mask.states, again.mask.states)
    assert not torch.equal(first.mask.states, other.mask.states)
    assert all(x is images for x in seen) and len(seen) == 3
    assert stage.hard_count(64) == round(38 * 0.45)  # alpha = 0.3 + 0.25 * 0.6


def test_the_guide_is_not_read_while_no_cell_is_chosen_by_difficulty():
    def guide(images, grid):
        raise AssertionError("the guide was read")

    stage = HardPatchMask(0.75, patch_size=4)
    stage.bind(guide)
    stage.set_progress(0.01)  # alpha 0.005: round(48 * 0.005) = 0 hard cells
    assert stage(Batch(images=torch.rand(2, 3, 32, 32), seed=0)).mask.counts == (16, 48, 0)
    stage.set_progress(0.1)
    with pytest.raises(AssertionError, match="the guide was read"):
        stage(Batch(images=torch.rand(2, 3, 32, 32), seed=0))


def test_the_guide_runs_without_grad():
    weight = torch.ones(1, requires_grad=True)
    grads = []

    def guide(images, grid):
        grads.append(torch.is_grad_enabled())
        return (images.mean(1)[:, ::4, ::4] * weight).float()

    stage = HardPatchMask(0.75, patch_size=4, start_hard=0.5)
    stage.bind(guide)
    stage(Batch(images=torch.rand(2, 3, 32, 32), seed=0))
    assert grads == [False]


def test_progress_is_saved_with_the_stage():
    stage = HardPatchMask(patch_size=4)
    stage.set_progress(0.7)
    restored = HardPatchMask(patch_size=4)
    restored.load_state_dict(stage.state_dict())
    assert restored.progress == 0.7 and restored.hard_fraction() == pytest.approx(0.35)
    assert hard_fraction_at(2.0) == 0.5 and hard_fraction_at(-1.0) == 0.0


def test_the_registry_entry_builds_the_papers_defaults():
    entry = MASKS["hpm"]
    assert (entry.guide, entry.emits, entry.families) == ("difficulty", "patch", ("vit",))
    stage = entry.build(entry.small(4, 32), MaskContext(patch_size=4, image_size=32))
    assert (stage.ratio, stage.start_hard, stage.end_hard, stage.patch_size) == (0.75, 0.0, 0.5, 4)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\), got 1.0"):
        HardPatchMask(1.0)
    with pytest.raises(ValueError, match=r"end_hard must be a share of the masked cells in \[0, 1\], got 1.5"):
        HardPatchMask(end_hard=1.5)
    with pytest.raises(ValueError, match=r"hard_fraction must be in \[0, 1\], got -0.1"):
        hard_patch_mask(torch.zeros(1, 2, 2), 0.5, -0.1)
    with pytest.raises(ValueError, match=r"difficulty must be \(B, Gh, Gw\), got shape \(1, 4\)"):
        hard_patch_mask(torch.zeros(1, 4), 0.5, 0.5)
    stage = HardPatchMask(0.75, patch_size=4, start_hard=0.5)
    batch = Batch(images=torch.rand(2, 3, 32, 32), seed=0)
    with pytest.raises(RuntimeError, match="HardPatchMask has no guide"):
        stage(batch)
    stage.bind(lambda images, grid: torch.rand(2, 64))
    with pytest.raises(
        ValueError, match=r"difficulty of shape \(2, 64\); the 8x8 grid of patch_size=4 needs \(2, 8, 8\)"
    ):
        stage(batch)
    with pytest.raises(TypeError, match="call it on a Batch"):
        stage.sample(2, (32, 32), None, "cpu")
