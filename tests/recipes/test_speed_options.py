"""Memory and speed options: gradient checkpointing, channels-last, torch.compile; the loss is unchanged."""

import pytest
import torch

from masklab.pipeline import Batch
from masklab.recipes.build import build_model
from masklab.recipes.config import load_config
from masklab.transforms import RandomMask

VIT = ["model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "objective.decoder_dim=32", "data.resolution=16"]
CNN = ["model.backbone=resnet18", "model.patch_size=4", "model.small_stem=true", "data.resolution=16"]


def loss_and_grads(recipe: str, overrides: list[str]):
    torch.manual_seed(0)
    model = build_model(load_config(recipe, overrides)).train()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = RandomMask(0.5, patch_size=4)(Batch(images=images, seed=0))
    loss = model(batch).loss
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("recipe", "overrides"), [("mae", VIT), ("simmim", CNN)])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(recipe, overrides):
    plain, loss, grads = loss_and_grads(recipe, overrides)
    ckpt, loss_ckpt, grads_ckpt = loss_and_grads(recipe, [*overrides, "model.grad_checkpointing=true"])
    assert ckpt.backbone.model.grad_checkpointing and not plain.backbone.model.grad_checkpointing
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5)


def test_the_vit_adapter_recomputes_its_blocks_when_checkpointing(monkeypatch):
    from timm.models import _manipulate

    calls = []
    original = _manipulate.checkpoint_seq
    monkeypatch.setattr(_manipulate, "checkpoint_seq", lambda *a, **k: calls.append(1) or original(*a, **k))
    import timm.models

    monkeypatch.setattr(timm.models, "checkpoint_seq", _manipulate.checkpoint_seq)
    loss_and_grads("mae", [*VIT, "model.grad_checkpointing=true"])
    assert calls  # the adapter's own block loop, not timm's forward, honoured the flag


def test_channels_last_cnn_same_loss_and_refused_for_a_vit():
    _, loss, _ = loss_and_grads("simmim", CNN)
    model, loss_cl, _ = loss_and_grads("simmim", [*CNN, "model.channels_last=true"])
    assert model.backbone.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loss_cl, loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="model.channels_last is for CNNs"):
        build_model(load_config("mae", [*VIT, "model.channels_last=true"]))


@pytest.mark.slow
def test_a_compiled_vit_trains_with_the_same_losses(tmp_path):
    from masklab.recipes.train import train

    run = [*VIT, "objective.decoder_depth=1", "data.length=32", "data.batch_size=16", "run.max_steps=3"]
    run += ["run.progress=false", "eval.at_end=false", "optim.mixed_precision=no"]
    plain = train(load_config("mae", [*run, f"run.out={tmp_path / 'a'}"]))
    compiled = train(load_config("mae", [*run, "model.compile=true", f"run.out={tmp_path / 'b'}"]))
    assert len(compiled.losses) == 3
    assert load_config("mae", ["optim.mixed_precision=no"]).optim.mixed_precision == "no"  # not YAML's false
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(plain.losses), atol=1e-4, rtol=1e-4)
