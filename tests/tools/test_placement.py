import numpy as np
import pytest
import torch

from masklab.pipeline import Shapes
from masklab.recipes.config import load_config
from masklab.recipes.train import train
from masklab.tools.placement import mask_placement, placement_shares

SMALL = ["data.train=builtin:shapes-grey", "data.length=32", "data.batch_size=16", "data.resolution=32"]
RUN = ["run.max_steps=1", "run.progress=false", "eval.at_end=false"]


def _checkpoint(tmp_path_factory, recipe: str, *extra: str):
    out = tmp_path_factory.mktemp(recipe)
    return train(load_config(recipe, [*SMALL, *extra, *RUN, f"run.out={out}"])).checkpoint


@pytest.fixture(scope="module")
def amt_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "mae_amt", "model.kwargs={depth: 1}")


def test_shares_by_hand_and_errors():
    # Two samples of a 2x2 grid over 4x4 pixels; cell shares: [[1, 0], [0, 1]] and [[0.5, 0.25], [1, 0]].
    coverage = torch.zeros(2, 4, 4)
    coverage[0, :2, :2] = coverage[0, 2:, 2:] = 1
    coverage[1, :2, :2] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    coverage[1, 0, 2] = 1
    coverage[1, 2:, :2] = 1
    states = torch.tensor([[[1, 0], [2, 1]], [[1, 1], [0, 2]]])
    shares = placement_shares(states, coverage)
    assert shares == {"visible": (0 + 1.0) / 2, "masked": (1 + 1 + 0.5 + 0.25) / 4, "thrown": 0.0, "all": 3.75 / 8}
    assert "thrown" not in placement_shares(states.clamp(max=1), coverage)  # no cell in that state: left out
    with pytest.raises(ValueError, match=r"states must be \(B, Gh, Gw\) and coverage \(B, H, W\) for the same B"):
        placement_shares(states[:1], coverage)
    with pytest.raises(ValueError, match="coverage of 4x4 pixels does not divide into the 3x3 grid"):
        placement_shares(torch.zeros(2, 3, 3, dtype=torch.uint8), coverage)


def test_coverage_is_where_the_shape_is_drawn():
    data = Shapes(size=32, length=8, background="grey", split="test")
    for i in range(8):
        image, _ = data[i]
        cover = data.coverage(i)
        grey = image.astype(float).mean(axis=2)
        inside, outside = grey[cover == 1], grey[cover == 0]
        assert inside.size and outside.size and cover.min() == 0 and cover.max() == 1
        # The shape's pixels and the background's each vary by their faint noise and the resampling's ringing;
        # their means lie further apart than three times that, in every image (the closest here: 11.5 grey
        # levels against a spread of 2.1).
        assert abs(inside.mean() - outside.mean()) > 3 * max(inside.std(), outside.std()), i


def test_an_amt_checkpoint_draws_its_own_guided_masks_over_held_out_shapes(amt_checkpoint):
    shares = mask_placement(amt_checkpoint, n=8)
    assert set(shares) == {"visible", "masked", "thrown", "all"}  # refreshed: AMT throws
    # The states' shares, weighted by their counts (the recipe's 0.45 masked and 0.40 thrown of the 8x8
    # patches of 4 px: 29, 25 and 10 visible), give back the share of all cells.
    counts = {"masked": 29, "thrown": 25, "visible": 10}
    total = sum(counts[s] * shares[s] for s in counts) / 64
    assert total == pytest.approx(shares["all"])
    data = Shapes(size=32, length=8, background="grey", split="test")
    assert shares["all"] == pytest.approx(np.mean([data.coverage(i).mean() for i in range(8)]))
    # The draw is the run's seed's (run.seed, 0 here) unless given: another seed draws other cells.
    assert mask_placement(amt_checkpoint, n=8, seed=0) == shares != mask_placement(amt_checkpoint, n=8, seed=1)
    with pytest.raises(ValueError, match="n .images to draw over. must be at least 1, got 0"):
        mask_placement(amt_checkpoint, n=0)


def test_runs_without_a_patch_mask_have_no_placement(tmp_path_factory):
    cnn = "model.kwargs={channels: [8, 16, 32, 64], stem_width: 8}"
    assert mask_placement(_checkpoint(tmp_path_factory, "supervised", cnn), n=4) is None
    assert mask_placement(_checkpoint(tmp_path_factory, "moco", cnn), n=4) is None


def test_another_recipes_mask_drawn_from_a_checkpoints_guidance(tmp_path_factory):
    mae = _checkpoint(tmp_path_factory, "mae", "model.kwargs={depth: 1}")
    own, amt = mask_placement(mae, n=8), mask_placement(mae, n=8, mask_of="mae_amt")
    assert set(own) == {"visible", "masked", "all"}  # MAE's random mask throws nothing
    assert set(amt) == {"visible", "masked", "thrown", "all"} and amt["all"] == own["all"]  # AMT's, from MAE's saliency
    cnn = "model.kwargs={channels: [8, 16, 32, 64], stem_width: 8}"
    # A CNN's saliency (its last feature map's activation norm) drives AMT's mask too, on the CNN's grid.
    assert set(mask_placement(_checkpoint(tmp_path_factory, "moco", cnn), n=4, mask_of="mae_amt")) == set(amt)
