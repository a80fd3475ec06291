"""Each loss against its reference formula, transcribed here in a few lines from the paper and the
authors' code (facebookresearch/mae, microsoft/SimMIM, facebookresearch/moco, kirill-vish/MixMask,
Haochen-Wang409/HPM, BYOL's and SimSiam's papers), on fixed seeded tensors, to 1e-6 (HPM's to 1e-4: its
reference takes the log of a sigmoid plus 1e-6).

The transcriptions use none of masklab's helpers: patches, logits and cosines are written out, so a
missing normalisation, a swapped partner or a changed scale shows up as a mismatch.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from masklab.objectives import (
    HPM,
    MAE,
    MixMaskSiamese,
    Siamese,
    SimMIM,
    build_backbone,
    infonce_loss,
    mae_loss,
    mixmask_loss,
    negative_cosine,
    pairwise_order_loss,
    simmim_loss,
)
from masklab.pipeline import Batch
from masklab.transforms import PatchMask

TOL = {"atol": 1e-6, "rtol": 1e-6}


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def random_masking(batch: int, cells: int, masked: int, seed: int = 0) -> torch.Tensor:
    """``(B, N)`` float, 1 = removed: MAE's random_masking (argsort of noise, the first cells kept)."""
    noise = torch.rand(batch, cells, generator=torch.Generator().manual_seed(seed))
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return (ids_restore >= cells - masked).float()


def mae_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's patchify: ``(N, 3, H, W) -> (N, L, p * p * 3)`` by reshape and einsum 'nchpwq->nhwpqc'."""
    n, c, h, w = imgs.shape[0], imgs.shape[1], imgs.shape[2] // p, imgs.shape[3] // p
    x = imgs.reshape(n, c, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)


def mae_forward_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool):
    """MAE's forward_loss: pred (N, L, p*p*3) for every patch, mask (N, L) with 1 = removed."""
    target = mae_patchify(imgs, p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (N, L): mean loss per patch
    return (loss * mask).sum() / mask.sum()  # mean over removed patches


# -- MAE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_is_maes_forward_loss(norm_pix):
    imgs, pred = seeded(3, 3, 16, 16), seeded(3, 16, 48, seed=1)
    mask = random_masking(3, 16, 12)
    want = mae_forward_loss(imgs, pred, mask, 4, norm_pix)
    ids = torch.nonzero(mask)[:, 1].view(3, 12)  # each sample's removed patches
    pick = lambda t: t.gather(1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    got = mae_loss(pick(pred), pick(mae_patchify(imgs, 4)), norm_pix=norm_pix)
    torch.testing.assert_close(got, want, **TOL)


def test_the_mae_objective_scores_its_predictions_as_maes_forward_loss():
    """MAE.forward with the decoder's output fixed: our patch order, mask gather and target match MAE's."""
    torch.manual_seed(0)
    model = MAE(build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1), 32, 1)
    imgs, pred = seeded(3, 3, 16, 16), seeded(3, 16, 48, seed=1)
    removed = random_masking(3, 16, 12)
    mask = PatchMask.from_masked(removed.bool().view(3, 4, 4))
    model.predict = lambda images, mask: pred.gather(1, mask.ids_masked.unsqueeze(-1).expand(-1, -1, 48))
    got = model(Batch(images=imgs, mask=mask)).loss
    torch.testing.assert_close(got, mae_forward_loss(imgs, pred, removed, 4, norm_pix=True), **TOL)
    # The per-patch normalisation matters: without it the loss differs.
    assert not torch.allclose(got, mae_forward_loss(imgs, pred, removed, 4, norm_pix=False), atol=1e-3)


# -- HPM ----------------------------------------------------------------------------------------------


def hpm_relative_loss(loss_pred: torch.Tensor, loss_target: torch.Tensor) -> torch.Tensor:
    """HPM's relative learning loss: for each sample, the L x L matrix of predicted differences, a
    log-sigmoid term for every pair ordered one way and a log(1 - sigmoid) term for every pair ordered
    the other, summed and divided by the count of ordered (untied) pairs."""
    positive = (loss_target.unsqueeze(1) > loss_target.unsqueeze(2)).float()
    negative = (loss_target.unsqueeze(1) < loss_target.unsqueeze(2)).float()
    difference = loss_pred.unsqueeze(1) - loss_pred.unsqueeze(2)
    terms = -positive * torch.log(torch.sigmoid(difference) + 1e-6) - negative * torch.log(
        1 - torch.sigmoid(difference) + 1e-6
    )
    return terms.sum() / (positive + negative).sum()


def test_pairwise_order_loss_is_hpms_relative_loss():
    predicted, target = seeded(4, 12), seeded(4, 12, seed=1).abs()
    target[:, 1] = target[:, 0]  # a tie, left out by both
    torch.testing.assert_close(
        pairwise_order_loss(predicted, target), hpm_relative_loss(predicted, target), atol=1e-4, rtol=1e-4
    )


def test_the_hpm_objective_adds_maes_forward_loss_and_hpms_relative_loss_on_the_masked_patches():
    """HPM.forward with the decoder's and the predictor's outputs fixed: the reconstruction term is MAE's
    forward_loss and the order term HPM's relative loss on each removed patch's predicted and true loss."""
    torch.manual_seed(0)
    model = HPM(build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1), 32, 1, predictor_depth=1)
    imgs, pred, scores = seeded(3, 3, 16, 16), seeded(3, 16, 48, seed=1), seeded(3, 16, seed=2)
    removed = random_masking(3, 16, 12)
    mask = PatchMask.from_masked(removed.bool().view(3, 4, 4))
    model.reconstruct_tokens = lambda tokens, mask: pred.gather(1, mask.ids_masked.unsqueeze(-1).expand(-1, -1, 48))

    class FixedScores(nn.Module):  # the predictor's output: a score per cell, in the decoder's token order
        def forward(self, tokens):
            order = torch.cat([torch.zeros(3, 1, dtype=torch.long), 1 + mask.ids_keep, 1 + mask.ids_masked], dim=1)
            return torch.cat([torch.zeros(3, 1), scores], dim=1).gather(1, order).unsqueeze(-1)

    model.loss_predictor = FixedScores()
    out = model(Batch(images=imgs, mask=mask))
    target = mae_patchify(imgs, 4)
    target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
    ids = torch.nonzero(removed)[:, 1].view(3, 12)  # the removed patches, ascending, as the reference's mask gather
    want_order = hpm_relative_loss(scores.gather(1, ids), per_patch.gather(1, ids))
    torch.testing.assert_close(out.logs["reconstruction"], mae_forward_loss(imgs, pred, removed, 4, True), **TOL)
    torch.testing.assert_close(out.logs["order"], want_order, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, out.logs["reconstruction"] + out.logs["order"], **TOL)


# -- SimMIM -------------------------------------------------------------------------------------------


def simmim_reference(x: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """SimMIM's loss: mask (B, h, w) 1 = masked, upsampled to (B, 1, H, W); L1 summed over masked
    pixels and channels, divided by the masked pixel count (+ 1e-5) and by in_chans."""
    mask = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / x.shape[1]


def test_simmim_loss_on_pixels_and_on_patches_is_simmims():
    x, x_rec = seeded(2, 3, 16, 16), seeded(2, 3, 16, 16, seed=1)
    masked = random_masking(2, 16, 10).view(2, 4, 4)
    want = simmim_reference(x, x_rec, masked, 4)
    pixels = masked.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)  # (B, 1, H, W), not per channel
    torch.testing.assert_close(simmim_loss(x_rec, x, pixels), want, **TOL)
    # The ViT head's form: (B, N, p * p * 3) patches with a (B, N, 1) weight.
    patches = simmim_loss(mae_patchify(x_rec, 4), mae_patchify(x, 4), masked.view(2, 16, 1))
    torch.testing.assert_close(patches, want, **TOL)


def test_the_simmim_objective_on_a_cnn_scores_its_reconstruction_as_simmim():
    """SimMIM.forward (CNN path) with the head's output fixed: its pixel weights are SimMIM's upsampled mask."""

    class Fixed(nn.Module):
        def __init__(self, out: torch.Tensor) -> None:
            super().__init__()
            self.out = out

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.out

    torch.manual_seed(0)
    model = SimMIM(build_backbone("resnet18"))
    x, x_rec = seeded(2, 3, 32, 32), seeded(2, 3, 32, 32, seed=1)
    masked = random_masking(2, 16, 10).view(2, 4, 4)
    model.head = Fixed(x_rec)
    got = model(Batch(images=x, mask=PatchMask.from_masked(masked.bool()))).loss
    torch.testing.assert_close(got, simmim_reference(x, x_rec, masked, 8), **TOL)


# -- MoCo ---------------------------------------------------------------------------------------------


def moco_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, reduction="mean"):
    """MoCo's builder: normalised q and k, l_pos (N, 1), l_neg against the (C, K) queue, logits / T,
    cross-entropy with label 0."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, labels, reduction=reduction)


def test_infonce_loss_is_mocos_logits_and_cross_entropy():
    q, k = seeded(6, 8), seeded(6, 8, seed=1)
    queue = F.normalize(seeded(8, 20, seed=2), dim=0)  # MoCo keeps (C, K), normalised along C
    for temperature in (0.2, 0.07):
        want = moco_reference(q, k, queue, temperature, "none")
        torch.testing.assert_close(infonce_loss(q, k, queue.t(), temperature, "none"), want, **TOL)
    torch.testing.assert_close(infonce_loss(q, k, queue.t()), moco_reference(q, k, queue, 0.2), **TOL)


def stub_networks(model: Siamese, predict: torch.Tensor | None = None) -> None:
    """Replace the networks by fixed maps on flattened (B, D, 1, 1) "images": online (p, z), target 2x + 1."""
    model.online = lambda x: (x.flatten(1) if predict is None else x.flatten(1) @ predict, x.flatten(1))
    model.key = lambda x, projection=None, generator=None: (
        projection.detach() if model.momentum is None else 2 * x.flatten(1) + 1
    )


def as_images(*embeddings: torch.Tensor) -> list[torch.Tensor]:
    return [e.view(*e.shape, 1, 1) for e in embeddings]


def test_the_moco_objective_is_mocos_loss_and_queue_update():
    model = Siamese(build_backbone("resnet18"), "moco", hidden=8, dim=4, queue_size=10)
    stub_networks(model)
    queue = model.queue.keys.t().clone()  # (C, K) as MoCo keeps it
    x_q, x_k = seeded(6, 4), seeded(6, 4, seed=1)
    out = model(Batch(images=x_q.view(6, 4, 1, 1), views=as_images(x_q, x_k)))
    k = 2 * x_k + 1
    torch.testing.assert_close(out.loss, moco_reference(x_q, k, queue, 0.2), **TOL)
    # _dequeue_and_enqueue: the normalised keys at ptr, the pointer moved by the batch.
    queue[:, 0:6] = F.normalize(k, dim=1).t()
    torch.testing.assert_close(model.queue.keys, queue.t(), **TOL)
    assert int(model.queue.ptr) == 6


# -- MixMask ------------------------------------------------------------------------------------------


def test_mixmask_loss_is_the_authors_with_one_lam_and_the_reversed_batch():
    """main_moco_mixmask.py: loss = loss_o + lam * loss_m + (1 - lam) * loss_m_flip, where
    mixed = mask * x + (1 - mask) * flip(x), and loss_m_flip scores flip(q_mixed) against k."""
    q, q_mix, k = seeded(6, 8), seeded(6, 8, seed=1), seeded(6, 8, seed=2)
    queue = F.normalize(seeded(8, 20, seed=3), dim=0)
    lam = 0.4375  # 7 of 16 cells
    loss_o = moco_reference(q, k, queue, 0.2)
    loss_m = moco_reference(q_mix, k, queue, 0.2)
    loss_m_flip = moco_reference(torch.flip(q_mix, (0,)), k, queue, 0.2)
    want = loss_o + lam * loss_m + (1 - lam) * loss_m_flip
    base = partial(infonce_loss, queue=queue.t(), temperature=0.2, reduction="none")
    reverse = torch.arange(5, -1, -1)  # its own inverse
    got = mixmask_loss(base, q, q_mix, k, torch.full((6,), lam), reverse)
    torch.testing.assert_close(got, want, **TOL)


def mixmask_by_definition(base, q, q_mix, k, lam, partner):
    """Per mixed image j (lam_j of image j, 1 - lam_j of partner[j]): lam_j base(q_mix_j, k_j) +
    (1 - lam_j) base(q_mix_j, k_partner[j]), summed over j, plus the plain loss; divided by B."""
    n = q.shape[0]
    plain = sum(base(q[i : i + 1], k[i : i + 1]) for i in range(n))
    mixed = sum(
        lam[j] * base(q_mix[j : j + 1], k[j : j + 1])
        + (1 - lam[j]) * base(q_mix[j : j + 1], k[partner[j] : partner[j] + 1])
        for j in range(n)
    )
    return ((plain + mixed) / n).squeeze(0)


@pytest.mark.parametrize("name", ["infonce", "negative_cosine"])
def test_mixmask_loss_with_a_lam_per_sample_and_a_random_partner_follows_the_definition(name):
    q, q_mix, k = seeded(6, 8), seeded(6, 8, seed=1), seeded(6, 8, seed=2)
    if name == "infonce":
        base = partial(infonce_loss, queue=F.normalize(seeded(20, 8, seed=3), dim=1), reduction="none")
    else:
        base = partial(negative_cosine, reduction="none")
    lam = torch.tensor([0.25, 0.5, 0.75, 0.375, 0.625, 0.5])
    partner = torch.tensor([2, 0, 4, 5, 1, 3])  # one 6-cycle: not its own inverse
    inverse = torch.argsort(partner)
    want = mixmask_by_definition(base, q, q_mix, k, lam, partner)
    torch.testing.assert_close(mixmask_loss(base, q, q_mix, k, lam, inverse), want, **TOL)
    # Passing the partner where the inverse belongs pairs the mixed views with the wrong keys.
    assert not torch.allclose(mixmask_loss(base, q, q_mix, k, lam, partner), want, atol=1e-3)


def test_the_mixmask_moco_objective_is_the_authors_loss():
    model = MixMaskSiamese(build_backbone("resnet18"), "moco", hidden=8, dim=4, queue_size=10)
    stub_networks(model)
    queue = model.queue.keys.t().clone()
    x_q, x_k, x_mix = seeded(6, 4), seeded(6, 4, seed=1), seeded(6, 4, seed=2)
    lam, reverse = 0.5625, torch.arange(5, -1, -1)
    mix = {"images": x_mix.view(6, 4, 1, 1), "lam": torch.full((6,), lam), "partner": reverse, "inverse": reverse}
    out = model(Batch(images=x_q.view(6, 4, 1, 1), views=as_images(x_q, x_k), mix=mix))
    k = 2 * x_k + 1
    want = (
        moco_reference(x_q, k, queue, 0.2)
        + lam * moco_reference(x_mix, k, queue, 0.2)
        + (1 - lam) * moco_reference(torch.flip(x_mix, (0,)), k, queue, 0.2)
    )
    torch.testing.assert_close(out.loss, want, **TOL)


# -- BYOL and SimSiam ---------------------------------------------------------------------------------


def byol_reference(p1, p2, z1_target, z2_target):
    """BYOL's paper: per direction 2 - 2 <p, z'> / (|p| |z'|), averaged over the batch; the two
    directions summed."""

    def direction(p, z):
        return (2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1)).mean()

    return direction(p1, z2_target) + direction(p2, z1_target)


def simsiam_reference(p1, p2, z1, z2):
    """SimSiam's paper: D(p, z) = -(p / |p|) . (z / |z|) with z detached, averaged over the batch;
    L = D(p1, z2) / 2 + D(p2, z1) / 2."""

    def d(p, z):
        z = z.detach()
        return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()

    return d(p1, z2) / 2 + d(p2, z1) / 2


PREDICT = seeded(4, 4, seed=9)  # a fixed "predictor", so predictions differ from projections


def test_the_simsiam_objective_is_simsiams_loss():
    model = Siamese(build_backbone("resnet18"), "simsiam", hidden=8, dim=4, pred_hidden=8)
    stub_networks(model, PREDICT)
    x1, x2 = seeded(6, 4), seeded(6, 4, seed=1)
    out = model(Batch(images=x1.view(6, 4, 1, 1), views=as_images(x1, x2)))
    want = simsiam_reference(x1 @ PREDICT, x2 @ PREDICT, x1, x2)
    torch.testing.assert_close(out.loss, want, **TOL)


def test_the_byol_objective_is_a_quarter_of_byols_loss_less_one():
    """Our symmetric scale is SimSiam's: L_BYOL = 4 + 4 L (the same gradients times 4)."""
    model = Siamese(build_backbone("resnet18"), "byol", hidden=8, dim=4, pred_hidden=8)
    stub_networks(model, PREDICT)
    x1, x2 = seeded(6, 4), seeded(6, 4, seed=1)
    out = model(Batch(images=x1.view(6, 4, 1, 1), views=as_images(x1, x2)))
    reference = byol_reference(x1 @ PREDICT, x2 @ PREDICT, 2 * x1 + 1, 2 * x2 + 1)
    torch.testing.assert_close(4 + 4 * out.loss, reference, **TOL)
    # One direction is 2 + 2 negative_cosine.
    one = byol_reference(x1 @ PREDICT, x1 @ PREDICT, 2 * x2 + 1, 2 * x2 + 1) / 2
    torch.testing.assert_close(2 + 2 * negative_cosine(x1 @ PREDICT, 2 * x2 + 1), one, **TOL)
