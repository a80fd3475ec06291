from dataclasses import dataclass

import pytest
import torch

from masklab.pipeline import Batch
from masklab.transforms import MASKS, MaskContext, MaskOptions, PatchMask, RandomMask, Views, register_mask


def test_unknown_names_are_named_with_the_close_ones_and_every_known_one():
    with pytest.raises(ValueError) as error:
        MASKS["blok"]
    assert str(error.value) == f"unknown mask 'blok'; did you mean 'block'? known: {', '.join(MASKS.names())}"


def test_a_name_registers_once_and_declarations_are_checked():
    @dataclass
    class Options(MaskOptions):
        ratio: float = 0.5

    with pytest.raises(ValueError, match="mask 'random' is registered already"):
        register_mask("random", options=Options, emits="patch", small=lambda p, s: Options())(RandomMask)
    with pytest.raises(ValueError, match=r"emits must be one of \('patch', 'mix', 'feature'\), got 'pixels'"):
        register_mask("other", options=Options, emits="pixels", small=lambda p, s: Options())
    with pytest.raises(TypeError, match="options of mask 'other' must subclass MaskOptions"):
        register_mask("other", options=dict, emits="patch", small=lambda p, s: Options())
    assert "other" not in MASKS


@pytest.mark.parametrize("name", MASKS.names())
def test_every_stage_builds_from_its_small_options_and_draws_what_it_declares(name):
    entry = MASKS[name]
    options = entry.small(8, 64)
    assert type(options) is entry.options and options.name == name
    stage = entry.build(options, MaskContext(patch_size=8, image_size=64, num_samples=4))
    if entry.stage is None:
        assert stage is None and entry.emits is None
        return
    assert isinstance(stage, entry.stage)
    if entry.guide is not None:
        cells = 64 // 8
        per_cell = (cells, cells)
        shapes = {"saliency": per_cell, "difficulty": per_cell, "affinity": (cells * cells, cells * cells)}[entry.guide]
        stage.bind(lambda images, grid: torch.rand(len(images), *shapes))
    batch = Views(2, "byol")(Batch(images=torch.rand(4, 3, 64, 64), index=torch.arange(4), seed=0))
    out = stage(batch)
    if entry.emits == "patch":
        assert isinstance(out.mask, PatchMask) and out.mask.grid == (8, 8) and out.mask.num_masked > 0
    elif entry.emits == "mix":
        assert out.mix is not None and out.mix["images"].shape == (4, 3, 64, 64)
    else:
        assert len(out.extras["view_feature_masks"]) == 2
