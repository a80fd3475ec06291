import pytest
import torch

from masklab.objectives import BASES, Siamese, build_backbone, infonce_loss, negative_cosine
from masklab.pipeline import Batch


def tiny(base: str, **kwargs) -> Siamese:
    torch.manual_seed(0)
    return Siamese(build_backbone("resnet18"), base, hidden=16, dim=8, pred_hidden=16, queue_size=12, **kwargs)


def two_views(n: int = 4) -> Batch:
    views = [torch.rand(n, 3, 32, 32), torch.rand(n, 3, 32, 32)]
    return Batch(images=views[0], views=views)


def test_negative_cosine_by_hand():
    p = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    z = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    assert negative_cosine(p, z).item() == pytest.approx((0.0 - 2**-0.5) / 2)


def test_the_bases_are_the_papers():
    moco = tiny("moco")
    assert moco.queue.size == 12 and moco.temperature == 0.2 and not moco.symmetric
    assert moco.momentum.base == moco.momentum.final == 0.999 and isinstance(moco.predictor, torch.nn.Identity)
    byol = tiny("byol")
    assert (byol.momentum.base, byol.momentum.final) == (0.99, 1.0) and byol.symmetric and byol.queue is None
    simsiam = tiny("simsiam")
    assert simsiam.momentum is None and simsiam.teachers() == [] and simsiam.queue is None
    assert BASES["moco"].hidden == 2048 and BASES["moco"].dim == 128
    with pytest.raises(ValueError, match="unknown base 'swav'"):
        tiny("swav")


@pytest.mark.parametrize("base", ["moco", "byol"])
def test_the_momentum_encoder_gets_no_gradient_and_follows_the_student(base):
    model = tiny(base, momentum=0.5, momentum_final=0.5)
    out = model(two_views())
    out.loss.backward()
    teacher = list(model.momentum.parameters())
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher)
    assert model.backbone.model.conv1.weight.grad.abs().sum() > 0
    before = model.momentum.module[0].model.conv1.weight.clone()
    with torch.no_grad():
        model.backbone.model.conv1.weight.add_(1.0)
    [(ema, student)] = model.teachers()
    ema.update(student, progress=0.5)
    # Decay 0.5: the teacher moves half way to the student.
    want = 0.5 * before + 0.5 * model.backbone.model.conv1.weight
    torch.testing.assert_close(model.momentum.module[0].model.conv1.weight, want)


def test_moco_enqueues_each_steps_keys_after_the_loss():
    model = tiny("moco")
    before = model.queue.keys.clone()
    model(two_views(4))
    assert int(model.queue.ptr) == 4
    assert not torch.equal(model.queue.keys[:4], before[:4]) and torch.equal(model.queue.keys[4:], before[4:])


def test_simsiam_is_symmetric_against_the_stopped_online_projection():
    model, batch = tiny("simsiam"), two_views()
    out = model(batch)
    out.loss.backward()
    assert all(p.grad is not None for p in model.predictor.parameters())
    with torch.no_grad():  # batch norm in training mode: the same batch gives the same outputs
        (p1, z1), (p2, z2) = model.online(batch.views[0]), model.online(batch.views[1])
    want = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2  # SimSiam's L: the mean of the directions
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_two_views_are_required():
    with pytest.raises(ValueError, match=r"two views in batch.views, got 0: add Views\(2, ...\)"):
        tiny("byol")(Batch(images=torch.rand(2, 3, 32, 32)))


def test_a_vit_backbone_works_too():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    out = Siamese(vit, "byol", hidden=16, dim=8, pred_hidden=16)(two_views(2))
    out.loss.backward()
    assert torch.isfinite(out.loss) and vit.model.patch_embed.proj.weight.grad is not None


def test_shuffle_bn_keys_depend_on_their_own_chunk_only_in_train_mode():
    model = tiny("moco", key_bn_splits=2).train()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    order = torch.tensor([6, 1, 3, 0, 2, 7, 5, 4])  # chunks {6, 1, 3, 0} and {2, 7, 5, 4}
    keys = model.key(x, order=order)
    other = x.clone()
    other[[2, 7]] = torch.rand(2, 3, 32, 32)  # samples of the second chunk only
    changed = model.key(other, order=order)
    torch.testing.assert_close(changed[[6, 1, 3, 0]], keys[[6, 1, 3, 0]], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[[5, 4]], keys[[5, 4]], atol=1e-3)  # their chunk-mates' statistics moved
    # Without splits every key sees every sample's statistics.
    whole = tiny("moco").train()
    assert not torch.allclose(whole.key(other)[[6, 1, 3, 0]], whole.key(x)[[6, 1, 3, 0]], atol=1e-3)


def test_shuffle_bn_keys_come_back_in_order():
    model = tiny("moco", key_bn_splits=2).eval()  # running statistics: the chunks no longer matter
    x = torch.rand(8, 3, 32, 32)
    order = torch.tensor([6, 1, 3, 0, 2, 7, 5, 4])
    torch.testing.assert_close(model.key(x, order=order), model.momentum(x), atol=1e-5, rtol=0)


def test_one_split_is_the_plain_momentum_encoder_and_the_shuffle_follows_the_batch_seed():
    import copy

    plain = tiny("moco").train()  # as the training loop runs it: the momentum encoder's BN on batch statistics
    batch = two_views(8)
    with torch.no_grad():
        q, _ = plain.online(batch.views[0])
        want = infonce_loss(q, plain.momentum(batch.views[1]), plain.queue.keys.clone(), 0.2)
    assert plain(batch).loss.item() == pytest.approx(want.item(), rel=1e-6)

    split = tiny("moco", key_bn_splits=2).train()
    copies = [copy.deepcopy(split) for _ in range(3)]
    seeded = [Batch(images=batch.images, views=batch.views, seed=s) for s in (0, 0, 1)]
    losses = [m(b).loss.item() for m, b in zip(copies, seeded, strict=True)]
    assert losses[0] == losses[1] != losses[2]  # drawn from the batch's seed: replayed on resume
    assert losses[0] != pytest.approx(want.item(), rel=1e-4)  # the chunks' statistics differ from the batch's


def test_key_bn_splits_is_checked_at_construction():
    with pytest.raises(ValueError, match="key_bn_splits must be a positive integer, got 0"):
        tiny("moco", key_bn_splits=0)
    with pytest.raises(ValueError, match="key_bn_splits=2 shuffles the momentum encoder's batch, but 'simsiam' has no"):
        tiny("simsiam", key_bn_splits=2)


def test_the_momentum_encoder_starts_in_the_students_mode_and_follows_train_and_eval():
    from masklab.objectives import EMATeacher

    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    teacher = EMATeacher(student)
    assert teacher.module.training and teacher.module[1].training
    teacher.eval()
    assert not teacher.module[1].training
    assert not EMATeacher(student.eval()).module.training
