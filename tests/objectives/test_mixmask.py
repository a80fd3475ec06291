import math
from functools import partial

import pytest
import torch

from masklab.objectives import (
    MixMaskSiamese,
    build_backbone,
    infonce_loss,
    mixmask_loss,
    mixmask_terms,
    negative_cosine,
)
from masklab.pipeline import Batch
from masklab.transforms import MixMask, Views

# Three images, 2-D embeddings at simple angles; lambda differs per sample and the partner is a
# 3-cycle, not the reversed batch: x_mix[j] = M_j x_q[j] + (1 - M_j) x_q[partner[j]].
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
K = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
Q_MIX = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
LAM = torch.tensor([0.75, 0.5, 0.25])
PARTNER = torch.tensor([2, 0, 1])
INVERSE = torch.tensor([1, 2, 0])  # inverse[partner[j]] == j
QUEUE = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])


def cos(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)


def by_hand(base, q, q_mix, k, lam, inv):
    """loss_i = base(q_i, k_i) + lam_i base(q_mix[i], k_i) + (1 - lam[inv[i]]) base(q_mix[inv[i]], k_i), averaged."""
    total = 0.0
    for i in range(len(q)):
        total += base(q[i], k[i]) + lam[i] * base(q_mix[i], k[i]) + (1 - lam[inv[i]]) * base(q_mix[inv[i]], k[i])
    return total / len(q)


def neg_cos_by_hand(q, k):
    return -cos(q, k)


def nce_by_hand(q, k, temperature=0.2):
    positive = math.exp(cos(q, k) / temperature)
    return -math.log(positive / (positive + sum(math.exp(cos(q, n) / temperature) for n in QUEUE.tolist())))


def test_inverse_is_the_partners_inverse():
    assert INVERSE[PARTNER].tolist() == [0, 1, 2]


def test_negative_cosine_loss_by_hand():
    # Per image: i0 -1 + 0.75*0 + 0.5*(-1); i1 0 + 0.5*(-1) + 0.75*(+1); i2 -1/sqrt2 + 0.25*0 + 0.25*(-1).
    want = (-1.5 + 0.25 + (-1 / math.sqrt(2) - 0.25)) / 3
    base = partial(negative_cosine, reduction="none")
    assert mixmask_loss(base, Q, Q_MIX, K, LAM, INVERSE).item() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(
        by_hand(neg_cos_by_hand, Q.tolist(), Q_MIX.tolist(), K.tolist(), LAM.tolist(), INVERSE.tolist())
    )


def test_infonce_loss_by_hand():
    base = partial(infonce_loss, queue=QUEUE, temperature=0.2, reduction="none")
    want = by_hand(nce_by_hand, Q.tolist(), Q_MIX.tolist(), K.tolist(), LAM.tolist(), INVERSE.tolist())
    assert mixmask_loss(base, Q, Q_MIX, K, LAM, INVERSE).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("base_name", ["moco", "byol", "simsiam"])
def test_the_objective_adds_the_base_and_mixed_terms_by_hand(base_name):
    """Each base through MixMaskSiamese.forward, with the networks replaced by the identity on fixed embeddings."""
    model = MixMaskSiamese(build_backbone("resnet18"), base_name, hidden=8, dim=2, pred_hidden=8, queue_size=2)
    model.online = lambda x: (x.flatten(1), x.flatten(1))
    model.key = lambda x, projection=None, generator=None: x.flatten(1)
    if model.queue is not None:
        model.queue.keys.copy_(QUEUE)
    q, k, q_mix = (x.view(3, 2, 1, 1) for x in (Q, K, Q_MIX))  # as (B, C, H, W) "images"
    batch = Batch(images=q, views=[q, k], mix={"images": q_mix, "lam": LAM, "partner": PARTNER, "inverse": INVERSE})
    out = model(batch)
    args = (Q.tolist(), Q_MIX.tolist(), K.tolist(), LAM.tolist(), INVERSE.tolist())
    if base_name == "moco":
        want = by_hand(nce_by_hand, *args)
        assert int(model.queue.ptr) == 1  # three keys pushed through a queue of two
    else:
        # Symmetric bases average the plain loss over both directions, -cos(q_i, k_i) and -cos(k_i, q_i):
        # with identity networks both are -cos(q_i, k_i), so the total is the one-direction form (a sum
        # of the directions would add another -cos(q_i, k_i)).
        want = by_hand(neg_cos_by_hand, *args)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    "base", [partial(negative_cosine, reduction="none"), partial(infonce_loss, queue=QUEUE, reduction="none")]
)
def test_lambda_one_reduces_the_mixed_terms_to_the_plain_loss_on_the_mixed_view(base):
    g = torch.Generator().manual_seed(0)
    q_mix, k = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    inverse = torch.randperm(6, generator=g)
    got = mixmask_terms(base, q_mix, k, torch.ones(6), inverse)
    torch.testing.assert_close(got, base(q_mix, k))


def test_shapes_are_checked_with_their_names():
    base = partial(negative_cosine, reduction="none")
    with pytest.raises(ValueError, match=r"lam \(2,\)"):
        mixmask_terms(base, Q, K, torch.ones(2), INVERSE)
    with pytest.raises(ValueError, match=r"q \(3, 2\) and q_mix \(2, 2\) differ"):
        mixmask_loss(base, Q, Q_MIX[:2], K, LAM, INVERSE)


def test_missing_mix_is_an_error_that_says_what_to_add():
    model = MixMaskSiamese(build_backbone("resnet18"), "byol", hidden=8, dim=4, pred_hidden=8)
    views = [torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)]
    with pytest.raises(ValueError, match=r"add MixMask\(view=0\)"):
        model(Batch(images=views[0], views=views))


def test_trains_on_the_stages_output_with_gradients_in_backbone_and_heads():
    torch.manual_seed(0)
    model = MixMaskSiamese(build_backbone("resnet18", small_stem=True), "moco", hidden=16, dim=8, queue_size=16)
    batch = Batch(images=torch.rand(4, 3, 32, 32), seed=0)
    for stage in (Views(2, "mocov2"), MixMask(grid=4, partner="permute", view=0)):
        batch = stage(batch)
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.logs) == {"loss", "plain", "mixed"}
    assert model.backbone.model.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.projector.parameters())
