"""One contract over every declared (backbone x mask stage x objective) triple."""

import pytest
import torch

from masklab.objectives import OBJECTIVES, build_backbone, supported_triples
from masklab.pipeline import Batch
from masklab.transforms import AttentionMask, BlockMask, HierarchicalMask, MixMask, RandomMask, SimMIMMask, Views

BACKBONES = {
    "vit_tiny_patch16_224": "vit",
    "deit_tiny_patch16_224": "vit",
    "resnet18": "cnn",
    "convnext_atto": "cnn",
}
SIZE = 32


def masked_batch(name: str, patch: int, model, images: torch.Tensor) -> Batch:
    batch = Batch(images=images, index=torch.arange(len(images)), seed=0)
    if name == "amt":
        # AMT masks and throws by the model's own saliency, refreshed once.
        stage = AttentionMask(len(images), ratio=0.45, throw_ratio=0.40, patch_size=patch)
        stage.bind(model.guidance("saliency"))
        stage.refresh([batch], (SIZE // patch, SIZE // patch))
        out = stage(batch)
        assert out.mask.num_thrown > 0
        return out
    if name == "ehm":
        # EHM masks whole regions of the model's affinity tree, halfway through its schedule.
        stage = HierarchicalMask(0.75, patch)
        stage.bind(model.guidance("affinity"))
        stage.set_progress(0.5)
        out = stage(batch)
        assert out.extras["regions"].shape == (len(images), SIZE // patch, SIZE // patch)
        return out
    if name == "feature":
        # MaskDeep: two views, nested feature masks for each.
        return model.mask_stage()(Views(2, "byol")(batch))
    if name in ("none", "mixmask"):
        # Siamese objectives: two views, and for MixMask the query view mixed.
        batch = Views(2, "byol")(batch)
        return MixMask(grid=4, partner="permute", view=0)(batch) if name == "mixmask" else batch
    stage = {
        "random": lambda: RandomMask(0.75, patch),
        "block": lambda: BlockMask(0.4, patch),
        "simmim": lambda: SimMIMMask(0.6, mask_patch_size=2 * patch, patch_size=patch),
    }[name]()
    return stage(batch)


TRIPLES = supported_triples(BACKBONES)
# Small heads and queue keep the siamese rows quick.
OPTIONS = {"hidden": 64, "dim": 32, "pred_hidden": 64, "queue_size": 256}


def options(objective: str) -> dict:
    if objective == "maskdeep":
        heads = {k: OPTIONS[k] for k in ("hidden", "dim", "pred_hidden")}
        return {**heads, "strides": (4, 8, 16), "groups": 2}  # 2x2 cells on the coarsest stage at 32 px
    return OPTIONS if objective.removeprefix("mixmask_") in ("moco", "byol", "simsiam") else {}


def test_the_matrix_covers_every_family_and_mask():
    # mae, simmim (5 masks each); three siamese bases with and without MixMask; maskdeep
    assert len(TRIPLES) == 30 + 4 * 6 + 4
    assert {b for b, _, _ in TRIPLES} == set(BACKBONES)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,mask,objective", TRIPLES, ids=["-".join(t) for t in TRIPLES])
def test_contract(backbone, mask, objective):
    torch.manual_seed(0)
    patch = 4 if BACKBONES[backbone] == "vit" else 8
    model = OBJECTIVES[objective](build_backbone(backbone, img_size=SIZE, patch_size=patch), **options(objective))
    batch = masked_batch(mask, patch, model, torch.rand(8, 3, SIZE, SIZE))

    out = model(batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    head_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads), "no gradient reached the backbone"
    assert head_grads and all(g is not None for g in head_grads), "a head parameter got no gradient"

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # MoCo's queue would fill with the fixed batch's own keys, its positives as negatives: keep the
    # first negatives, so the loss measures learning on this batch.
    queue = getattr(model, "queue", None)
    negatives = None if queue is None else {k: v.clone() for k, v in queue.state_dict().items()}
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        for teacher, student in getattr(model, "teachers", list)():
            teacher.update(student, progress=0.0)
        if negatives is not None:
            queue.load_state_dict(negatives)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], f"loss did not fall: {losses[0]:.4f} -> {losses[-5:]}"
