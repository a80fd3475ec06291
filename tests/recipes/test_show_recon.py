"""Reconstruction pictures: what MAE and SimMIM predict, with the visible cells as given."""

import pytest
import torch

from masklab.objectives import MAE, SimMIM, build_backbone
from masklab.objectives._common import gather_tokens, patchify
from masklab.recipes.cli import main
from masklab.recipes.config import load_config
from masklab.recipes.show_recon import reconstruction_rows
from masklab.recipes.train import train
from masklab.transforms import MASKED, THROWN, VISIBLE, RandomMask

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def masked_batch(throw: float = 0.0):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)
    mask = RandomMask(0.5, throw_ratio=throw, patch_size=4).sample(2, (16, 16), torch.Generator().manual_seed(0), "cpu")
    return images, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_reconstruction_is_visible_patches_and_predictions(norm_pix):
    images, mask = masked_batch(throw=0.25)
    mae = MAE(build_backbone("vit_tiny_patch16_224", 16, 4, **TINY), 32, 1, norm_pix=norm_pix).eval()
    out = patchify(mae.reconstruct(images, mask), 4)
    patches = patchify(images, 4)
    states = mask.states.flatten(1)
    torch.testing.assert_close(out[states == VISIBLE], patches[states == VISIBLE])
    assert out[states == THROWN].abs().max() == 0
    pred = mae.predict(images, mask)
    if norm_pix:  # mapped back with each true patch's statistics
        target = gather_tokens(patches, mask.ids_masked)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    torch.testing.assert_close(gather_tokens(out, mask.ids_masked), pred)


@pytest.mark.parametrize("backbone", ["vit", "cnn"])
def test_simmim_reconstruction_is_visible_cells_and_predictions(backbone):
    images, mask = masked_batch(throw=0.25)
    if backbone == "vit":
        net = build_backbone("vit_tiny_patch16_224", 16, 4, **TINY)
    else:
        net = build_backbone("resnet18", small_stem=True)
    simmim = SimMIM(net).eval()
    out = simmim.reconstruct(images, mask)
    pixels = mask.to_pixels(16, 16).unsqueeze(1).expand_as(images)
    torch.testing.assert_close(out[pixels == VISIBLE], images[pixels == VISIBLE])
    assert out[pixels == THROWN].abs().max() == 0
    pred, _, _, ids = simmim._predict(images, mask)
    if ids is None:
        torch.testing.assert_close(out[pixels == MASKED], pred[pixels == MASKED])
    else:  # predictions of the kept cells, in ``ids`` order: the MASKED ones are shown
        states = mask.states.flatten(1)
        kept_states = states.gather(1, ids)
        torch.testing.assert_close(patchify(out, 4)[states == MASKED], pred[kept_states == MASKED])


def test_show_recon_draws_a_checkpoint_and_refuses_a_siamese_one(tmp_path, capsys):
    run = ["data.resolution=16", "data.length=32", "data.batch_size=16", "run.max_steps=1", "run.progress=false"]
    run += ["eval.at_end=false", "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"]
    mae = train(load_config("mae", [*run, "objective.decoder_dim=32", f"run.out={tmp_path / 'mae'}"]))
    out = tmp_path / "recon.png"
    assert main(["show-recon", str(mae.checkpoint), "--out", str(out), "-n", "3"]) == 0
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out
    byol = train(
        load_config(
            "byol",
            [
                *run[:-1],
                "model.backbone=resnet18",
                "objective.proj_hidden=16",
                "objective.proj_dim=8",
                "objective.pred_hidden=16",
                f"run.out={tmp_path / 'b'}",
            ],
        )
    )
    from masklab.recipes.trained import load_trained

    cfg, model = load_trained(byol.checkpoint)
    with pytest.raises(ValueError, match="give a mae or simmim checkpoint"):
        reconstruction_rows(cfg, model, torch.rand(2, 3, 16, 16))
