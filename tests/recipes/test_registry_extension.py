"""A mask stage and an objective declared in this file only: the registries are the one place that
knows them, so config loading, the compatibility matrix, ``masklab list`` and training take them
with no other file touched."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from masklab.objectives import (
    OBJECTIVES,
    ObjectiveOptions,
    ObjectiveOutput,
    Support,
    compatibility,
    compatibility_table,
    mask_table,
    register_objective,
)
from masklab.recipes.build import build_loader, build_model
from masklab.recipes.config import load_config
from masklab.recipes.train import train
from masklab.transforms import (
    MASKS,
    VISIBLE,
    MaskContext,
    MaskOptions,
    Normalize,
    PatchMask,
    PatchMaskStage,
    check_ratio,
    erase_patches,
    mask_count,
    mask_from_scores,
    patch_grid,
    register_mask,
)

TINY = [
    "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "data.resolution=16",
    "data.length=32",
    "data.batch_size=8",
    "run.progress=false",
    "eval.at_end=false",
    "run.max_steps=3",
]


@dataclass
class CentreMaskOptions(MaskOptions):
    ratio: float = 0.5
    jitter: float = 0.5


class CentreMask(PatchMaskStage):
    """Masks the cells nearest the image centre; ``jitter`` (below the gap between rings) breaks ties."""

    def __init__(self, ratio: float, patch_size: int, jitter: float = 0.5) -> None:
        super().__init__(patch_size)
        self.ratio, self.jitter = check_ratio("ratio", ratio), float(jitter)

    @classmethod
    def from_options(cls, options: CentreMaskOptions, context: MaskContext) -> "CentreMask":
        return cls(options.ratio, context.patch_size, options.jitter)

    def sample(self, batch_size, image_size, generator, device) -> PatchMask:
        gh, gw = patch_grid(*image_size, self.patch_size)
        ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
        distance = ((ys - (gh - 1) / 2) ** 2 + (xs - (gw - 1) / 2) ** 2).flatten().float()
        noise = torch.rand((batch_size, gh * gw), generator=generator, device=device)
        return mask_from_scores(self.jitter * noise - distance, (gh, gw), mask_count(gh * gw, self.ratio))


@dataclass
class MaskedColourOptions(ObjectiveOptions):
    hidden: int = 32


class MaskedColour(nn.Module):
    """Predict the mean colour of an image's hidden cells from the pooled features of what is left."""

    def __init__(self, backbone: nn.Module, hidden: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(backbone.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 3))

    @classmethod
    def from_options(cls, backbone, options: MaskedColourOptions, mask: MaskOptions) -> "MaskedColour":
        return cls(backbone, options.hidden)

    def forward(self, batch) -> ObjectiveOutput:
        images, mask = batch.images, batch.mask
        hidden = (mask.to_pixels(*images.shape[-2:]) != VISIBLE).unsqueeze(1).to(images.dtype)  # (B, 1, H, W)
        target = (images * hidden).sum((2, 3)) / hidden.sum((2, 3)).clamp(min=1)  # (B, 3)
        loss = F.mse_loss(self.head(self.backbone(erase_patches(images, mask))), target)
        return ObjectiveOutput(loss, {"loss": loss.detach()})


@pytest.fixture
def registered():
    register_mask(
        "centre", options=CentreMaskOptions, emits="patch", small=lambda patch_size, image_size: CentreMaskOptions()
    )(CentreMask)
    register_objective("masked_colour", options=MaskedColourOptions, takes="patch")(MaskedColour)
    yield
    MASKS.remove("centre")
    OBJECTIVES.remove("masked_colour")


def test_the_new_entries_join_the_derived_matrix_the_listing_and_the_config(registered):
    assert "centre" in compatibility()["mae"].masks and "centre" in compatibility()["simmim"].masks
    # Patch masks that need no guidance (it offers none), on both families.
    assert compatibility()["masked_colour"] == Support(
        ("vit", "cnn"), ("block", "centre", "colormae", "multiblock", "random", "simmim")
    )
    assert (
        "| `masked_colour` | vit, cnn | block, centre, colormae, multiblock, random, simmim |" in compatibility_table()
    )
    assert "| `centre` | `CentreMask` | ratio, jitter | - |" in mask_table()
    cfg = load_config(None, ["mask.name=centre", "mask.jitter=0.1", "objective.name=masked_colour"])
    assert cfg.mask == CentreMaskOptions(name="centre", ratio=0.5, jitter=0.1)
    assert cfg.objective == MaskedColourOptions(name="masked_colour", hidden=32)
    with pytest.raises(ValueError, match=r"unknown config key 'mask.jiter'.*Did you mean 'jitter'"):
        load_config(None, ["mask.name=centre", "mask.jiter=0.1"])


def test_a_mask_stage_declared_in_a_test_trains_with_mae(registered, tmp_path):
    cfg = load_config("mae", [*TINY, "mask.name=centre", f"run.out={tmp_path}"])
    assert cfg.mask == CentreMaskOptions(name="centre", ratio=0.75)  # mae.yaml's mask.ratio
    loader = build_loader(cfg, "train", torch.device("cpu"), "vit")
    assert [type(s) for s in loader.chain.stages] == [Normalize, CentreMask]
    mask = next(iter(loader)).mask
    # 4x4 cells: the 4 central and the 8 next ones are masked (12 = 0.75 * 16), the corners stay visible.
    assert mask.counts == (4, 12, 0)
    assert not mask.masked[:, [0, 0, 3, 3], [0, 3, 0, 3]].any()
    result = train(cfg)
    assert result.updates == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert isinstance(list(result.stages)[-1], CentreMask)


def test_an_objective_declared_in_a_test_trains_through_build_model(registered, tmp_path):
    overrides = [*TINY, "objective.name=masked_colour", "objective.hidden=16", f"run.out={tmp_path}"]
    cfg = load_config("mae", overrides)  # mae.yaml's objective.decoder_* are mae's keys: dropped
    model = build_model(cfg)
    assert isinstance(model, MaskedColour) and model.head[0].out_features == 16
    result = train(cfg)
    assert result.updates == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert isinstance(result.model, MaskedColour)
    with pytest.raises(ValueError, match=r"objective 'masked_colour' does not take the 'amt' mask; it supports"):
        build_model(load_config("mae_amt", overrides))
