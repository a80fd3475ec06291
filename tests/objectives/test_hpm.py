import math

import pytest
import torch

from masklab.objectives import HPM, OBJECTIVES, build_backbone, mae_patch_losses, pairwise_order_loss, patchify
from masklab.objectives._common import gather_tokens
from masklab.pipeline import Batch
from masklab.transforms import MASKS, HardPatchMask, MaskContext, random_patch_mask


def tiny_hpm(seed=0, **kwargs):
    torch.manual_seed(seed)
    vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    return HPM(vit, decoder_dim=32, decoder_depth=1, **{"predictor_depth": 1, **kwargs})


def softplus(x):
    return math.log1p(math.exp(x))


def test_the_order_loss_equals_a_hand_computation():
    predicted = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 2.0, 2.0], [0.0, 1.0, 2.0]])
    # Sample 0: pairs (0,1) and (0,2) ordered, (1,2) tied and left out; sample 1: all three ordered.
    # Each pair's term is softplus(-(p_hi - p_lo)); both orders of a pair count, so 10 terms of 5 pairs.
    terms = [softplus(-1.0), softplus(-3.0), softplus(2.0), softplus(2.0), softplus(0.0)]
    assert pairwise_order_loss(predicted, target).item() == pytest.approx(sum(terms) / 5, rel=1e-6)


def test_the_order_loss_reads_only_orders():
    predicted, target = torch.randn(3, 7), torch.rand(3, 7)
    loss = pairwise_order_loss(predicted, target)
    assert pairwise_order_loss(predicted + 5.0, target.exp() * 10) == pytest.approx(loss.item(), rel=1e-5)
    assert pairwise_order_loss(predicted, torch.ones(3, 7)).item() == 0.0  # all tied: nothing to learn
    with pytest.raises(ValueError, match=r"predicted \(3, 7\) and target \(3, 6\) must both be \(B, n\)"):
        pairwise_order_loss(predicted, target[:, :6])


def test_free_scores_trained_on_the_order_loss_take_the_true_order():
    target = torch.rand(4, 12, generator=torch.Generator().manual_seed(0))
    scores = torch.zeros(4, 12, requires_grad=True)
    optimizer = torch.optim.SGD([scores], lr=5.0)
    for _ in range(200):
        optimizer.zero_grad()
        pairwise_order_loss(scores, target).backward()
        optimizer.step()
    assert torch.equal(scores.argsort(1), target.argsort(1))


def test_the_predictor_learns_which_patches_are_hard_on_a_toy_set():
    # The left half of every image is noise (hard to reconstruct), the right half flat grey (easy).
    model = tiny_hpm(norm_pix=False)
    generator = torch.Generator().manual_seed(0)
    noisy = (torch.arange(16) % 4 < 2).expand(16, 16)  # (B, N) on the 4x4 grid
    cells = torch.where(noisy.view(16, 1, 4, 4, 1, 1), torch.rand(16, 3, 4, 4, 8, 8, generator=generator), 0.5)
    images = cells.permute(0, 1, 2, 4, 3, 5).reshape(16, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    orders = []
    for step in range(40):
        out = model(Batch(images=images, mask=random_patch_mask(16, (4, 4), 0.75, torch.Generator().manual_seed(step))))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        orders.append(out.logs["order"].item())
    assert orders[0] > 0.6 and sum(orders[-5:]) / 5 < min(0.4, orders[0] / 2)  # chance is log 2 = 0.69
    # On a fresh mask, the predicted losses of the masked cells put every noisy cell above every flat one.
    mask = random_patch_mask(16, (4, 4), 0.75, torch.Generator().manual_seed(100))
    with torch.no_grad():
        tokens = model.decoder_tokens(images, mask)
        predicted = model.loss_predictor(tokens)[:, 1 + mask.num_visible :, 0]
    hard = noisy.gather(1, mask.ids_masked)
    above = predicted.unsqueeze(2) > predicted.unsqueeze(1)  # [b, i, j]: cell i predicted harder than cell j
    pairs = hard.unsqueeze(2) & ~hard.unsqueeze(1)
    assert above[pairs].float().mean() > 0.95


def test_the_order_loss_trains_the_predictor_and_encoder_but_never_the_reconstruction():
    images = torch.rand(4, 3, 32, 32)
    mask = random_patch_mask(4, (4, 4), 0.75, torch.Generator().manual_seed(0))
    grads = {}
    for weight in (1.0, 3.0):
        model = tiny_hpm(predictor_weight=weight)
        out = model(Batch(images=images, mask=mask))
        out.loss.backward()
        grads[weight] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        # the total is the reconstruction plus the weighted order loss, and the order loss is the hand formula
        tokens = model.decoder_tokens(images, mask)
        target = gather_tokens(patchify(images, 8), mask.ids_masked)
        losses = mae_patch_losses(model.reconstruct_tokens(tokens, mask), target)
        predicted = model.loss_predictor(tokens)[:, 1 + mask.num_visible :, 0]
        assert out.logs["reconstruction"].item() == pytest.approx(losses.mean().item(), rel=1e-5)
        assert out.logs["order"].item() == pytest.approx(pairwise_order_loss(predicted, losses).item(), rel=1e-5)
        assert out.loss.item() == pytest.approx(losses.mean().item() + weight * out.logs["order"].item(), rel=1e-5)
    one, three = grads[1.0], grads[3.0]
    predictor = [name for name in one if name.startswith("loss_predictor.")]
    assert predictor and all(one[name].abs().sum() > 0 for name in predictor)
    assert all(torch.allclose(three[name], 3 * one[name], atol=1e-6) for name in predictor)
    assert torch.equal(one["decoder_pred.weight"], three["decoder_pred.weight"])  # detached targets
    assert not torch.allclose(
        one["backbone.model.patch_embed.proj.weight"], three["backbone.model.patch_embed.proj.weight"]
    )


def test_difficulty_guidance_is_the_predictor_on_every_patch_without_grad():
    model = tiny_hpm()
    images = torch.rand(3, 3, 32, 32)
    guide = model.guidance("difficulty")
    for training in (True, False):
        model.train(training)
        difficulty = guide(images, (4, 4))
        assert model.training is training
        assert difficulty.shape == (3, 4, 4) and not difficulty.requires_grad
    everything = random_patch_mask(3, (4, 4), 0.0)
    expected = model.loss_predictor(model.decoder_tokens(images, everything))[:, 1:, 0].view(3, 4, 4)
    assert torch.allclose(difficulty, expected, atol=1e-6)
    assert model.guidance("saliency")(images, (4, 4)).shape == (3, 4, 4)  # MAE's kinds stay
    with pytest.raises(ValueError, match=r"grid \(8, 8\) is not the 4x4 grid of patch_size=8"):
        guide(images, (8, 8))
    with pytest.raises(ValueError, match="unknown guidance 'depth'; HPM offers 'saliency', 'affinity', 'difficulty'"):
        model.guidance("depth")


def test_the_stage_masks_what_the_live_model_predicts_hardest():
    model = tiny_hpm()
    stage = HardPatchMask(0.75, patch_size=8, start_hard=0.5, end_hard=0.5)  # 12 masked, 6 of them the hardest
    stage.bind(model.guidance("difficulty"))
    images = torch.rand(4, 3, 32, 32)
    before = stage(Batch(images=images, seed=0))
    hardest = model.difficulty(images).flatten(1).topk(6, dim=1).indices
    assert torch.equal(before.extras["hard"].flatten(1).nonzero()[:, 1].view(4, 6), hardest.sort(1).values)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(before).loss.backward()
    optimizer.step()
    after = stage(Batch(images=images, seed=0))  # the same seed: only the model changed
    assert not torch.equal(before.extras["hard"], after.extras["hard"])


def test_the_registry_builds_it_from_its_options():
    entry = OBJECTIVES["hpm"]
    assert entry.guides == ("saliency", "affinity", "difficulty") and entry.takes == "patch"
    assert "hpm" in MASKS and MASKS["hpm"].guide == "difficulty"
    options = entry.section(decoder_dim=32, decoder_depth=1, predictor_depth=3, predictor_weight=0.5)
    vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    model = entry.build(vit, options, MASKS["hpm"].small(8, 32))
    assert len(model.loss_predictor) == 3 + 2 and model.predictor_weight == 0.5
    stage = MASKS["hpm"].build(MASKS["hpm"].small(8, 32), MaskContext(patch_size=8, image_size=32))
    stage.bind(model.guidance(stage.guide_kind))
    stage.set_progress(1.0)
    assert stage(Batch(images=torch.rand(2, 3, 32, 32), seed=0)).mask.counts == (4, 12, 0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"predictor_depth": 0}, "predictor_depth must be at least 1, got 0"),
        ({"predictor_weight": 0.0}, "predictor_weight must be positive, got 0.0"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_hpm(**kwargs)
