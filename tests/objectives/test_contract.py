"""One contract over every (backbone x mask stage x objective) triple the registries declare compatible."""

import pytest
import torch

from masklab.objectives import OBJECTIVES, build_backbone, compatibility, supported_triples
from masklab.pipeline import Batch
from masklab.transforms import MASKS, MaskContext, Views

BACKBONES = {
    "vit_tiny_patch16_224": "vit",
    "resnet18": "cnn",
    "convnext_atto": "cnn",
}
# Another timm ViT by name (the same architecture as vit_tiny, so one triple shows the name resolves and trains;
# the whole matrix on it would repeat vit_tiny's code and double the ViT share of the suite).
OTHER_MODELS = {"deit_tiny_patch16_224": "vit"}
SIZE = 32
# The ViTs at two blocks: the contract is about what flows between a mask, a backbone and an objective, which
# two blocks exercise as twelve do (EHM's affinity sums blocks, MaskDeep picks several, AMT reads the last);
# twelve made the ViT triples two thirds of this test's time.
VIT_DEPTH = 2
STEPS = 20  # optimizer steps on one batch; the loss must fall by 10% (the mean of the last 5 against the first)


def masked_batch(mask: str, objective: str, patch: int, model, images: torch.Tensor) -> Batch:
    """``images`` through the views the objective needs and the mask stage (its small-image options)."""
    entry = MASKS[mask]
    batch = Batch(images=images, index=torch.arange(len(images), device=images.device), seed=0)
    if OBJECTIVES[objective].views:
        batch = Views(OBJECTIVES[objective].views, "byol")(batch)
    context = MaskContext(patch, SIZE, num_samples=len(images))
    stage = entry.build(entry.small(patch, SIZE), context)
    if stage is None:
        return batch
    if entry.guide is not None:
        stage.bind(model.guidance(entry.guide))
    if hasattr(stage, "refresh"):  # AMT masks and throws by the model's own saliency, refreshed once
        stage.refresh([batch], context.grid)
    if hasattr(stage, "set_progress"):  # EHM: halfway through its schedule
        stage.set_progress(0.5)
    out = stage(batch)
    if hasattr(stage, "refresh"):
        assert out.mask.num_thrown > 0
    return out


TRIPLES = supported_triples(BACKBONES)
CASES = [*TRIPLES, ("deit_tiny_patch16_224", "random", "mae")]


def test_the_matrix_covers_every_family_stage_and_objective():
    assert {b for b, _, _ in TRIPLES} == set(BACKBONES)
    assert {m for _, m, _ in TRIPLES} == set(MASKS.names())
    assert {o for _, _, o in TRIPLES} == set(OBJECTIVES.names())
    # Each objective with each of its masks, once per backbone of a family it supports.
    expected = sum(
        len(support.masks) * sum(family in support.families for family in BACKBONES.values())
        for support in compatibility().values()
    )
    assert len(TRIPLES) == expected


@pytest.mark.slow
@pytest.mark.parametrize("backbone,mask,objective", CASES, ids=["-".join(t) for t in CASES])
def test_contract(backbone, mask, objective, device):
    torch.manual_seed(0)
    family = {**BACKBONES, **OTHER_MODELS}[backbone]
    patch = 4 if family == "vit" else 8
    entry = OBJECTIVES[objective]
    depth = {"depth": VIT_DEPTH} if family == "vit" else {}
    backbone_module = build_backbone(backbone, img_size=SIZE, patch_size=patch, **depth)
    model = entry.build(backbone_module, entry.small(), MASKS[mask].small(patch, SIZE)).to(device)
    batch = masked_batch(mask, objective, patch, model, torch.rand(8, 3, SIZE, SIZE, device=device))

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
    for _ in range(STEPS):
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
