"""Stage abilities are declared protocols: a stage has one by having its methods, nothing else."""

import torch

from masklab.pipeline import Stage
from masklab.transforms import AttentionMask, BlockMask, HierarchicalMask, MixMask, RandomMask, SimMIMMask
from masklab.transforms.protocols import GuidedStage, ProgressAware, RefreshesCache

ABILITIES = (GuidedStage, ProgressAware, RefreshesCache)


def abilities(stage):
    return [cls.__name__ for cls in ABILITIES if isinstance(stage, cls)]


def test_the_guided_stages_declare_what_the_loop_drives():
    amt = AttentionMask(num_samples=8, patch_size=8)
    ehm = HierarchicalMask(patch_size=8)
    assert abilities(amt) == ["GuidedStage", "RefreshesCache"] and amt.guide_kind == "saliency"
    assert abilities(ehm) == ["GuidedStage", "ProgressAware"] and ehm.guide_kind == "affinity"


def test_model_free_stages_have_none_of_the_abilities():
    for stage in (RandomMask(0.75, patch_size=8), BlockMask(0.5, patch_size=8), SimMIMMask(0.6), MixMask(ratio=0.5)):
        assert abilities(stage) == [], type(stage).__name__


class Curriculum(Stage):
    """Evolves with training without deriving from any masklab stage that does."""

    def set_progress(self, progress):
        self.progress = progress

    def forward(self, batch):
        return batch


class HalfGuided(Stage):
    """Names a guide but cannot be bound: not a GuidedStage."""

    guide_kind = "saliency"

    def forward(self, batch):
        return batch


def test_an_ability_is_structural():
    assert abilities(Curriculum()) == ["ProgressAware"]
    assert abilities(HalfGuided()) == []
    assert not isinstance(torch.nn.Identity(), ABILITIES)
