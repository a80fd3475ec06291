import pytest
import torch
from PIL import Image

from masklab.recipes.cli import main
from masklab.recipes.show_masks import MASK_PICTURES, overlay
from masklab.transforms import MASKED, THROWN, VISIBLE


@pytest.mark.parametrize("mask", MASK_PICTURES)
def test_show_masks_writes_a_picture(mask, tmp_path, capsys):
    out = tmp_path / f"{mask}.png"
    assert main(["show-masks", "--mask", mask, "-n", "3", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as picture:
        assert picture.size[0] > 100 and picture.size[1] > 100


@pytest.mark.ffcv
def test_show_masks_over_a_beton(tmp_path, shapes_beton):
    out = tmp_path / "m.png"
    assert (
        main(
            [
                "show-masks",
                "--mask",
                "block",
                "--data",
                str(shapes_beton),
                "--size",
                "32",
                "--patch-size",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.exists()


def test_overlay_tints_hidden_cells_only():
    images = torch.full((1, 3, 2, 2), 0.5)
    states = torch.tensor([[[VISIBLE, MASKED], [THROWN, VISIBLE]]])
    out = overlay(images, states, alpha=1.0)
    assert torch.equal(out[0, :, 0, 0], images[0, :, 0, 0])
    assert out[0, 0, 0, 1] > out[0, 2, 0, 1]  # red
    assert out[0, 2, 1, 0] > out[0, 0, 1, 0]  # blue


def test_unknown_mask_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["show-masks", "--mask", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_ehm_picture_has_regions_and_masks_per_progress(tmp_path, monkeypatch):
    from masklab.recipes import show_masks as module

    drawn = {}
    monkeypatch.setattr(module, "draw_mask_picture", lambda rows, path, title: drawn.update(rows=rows, title=title))
    module.show_masks("ehm", tmp_path / "ehm.png", n=2, size=32, patch_size=4, progress=(0.0, 1.0))
    labels = [label for label, _ in drawn["rows"]]
    assert labels == ["image", "t=0: 32 regions", "t=0: masked 48", "t=1: 3 regions", "t=1: masked 48"]
    assert all(images.shape == (2, 3, 32, 32) for _, images in drawn["rows"])


def test_ehm_progress_outside_the_unit_range_is_refused(tmp_path, capsys):
    assert main(["show-masks", "--mask", "ehm", "--progress", "0.5,1.5", "--out", str(tmp_path / "x.png")]) == 2
    assert "error: progress values must lie in [0, 1], got [0.5, 1.5]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--progress takes comma-separated numbers, got 'half'"):
        main(["show-masks", "--mask", "ehm", "--progress", "half", "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("n", [0, -3])
def test_no_images_to_draw_names_the_option(n, tmp_path, capsys):
    assert main(["show-masks", "--mask", "random", "-n", str(n), "--out", str(tmp_path / "x.png")]) == 2
    assert f"error: -n (images to draw) must be at least 1, got {n}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def supervised_checkpoint(tmp_path_factory):
    from masklab.recipes.config import load_config
    from masklab.recipes.train import train

    out = tmp_path_factory.mktemp("supervised")
    small = ["data.length=32", "data.batch_size=16", "model.kwargs={channels: [8, 16, 32, 64], stem_width: 8}"]
    run = [f"run.out={out}", "run.max_steps=1", "run.progress=false", "eval.at_end=false"]
    return train(load_config("supervised", [*small, *run])).checkpoint


@pytest.mark.parametrize("mask,kind", [("amt", "saliency"), ("ehm", "affinity")])
def test_guided_masks_refuse_a_checkpoint_whose_model_offers_no_guidance(
    mask, kind, supervised_checkpoint, tmp_path, capsys
):
    args = ["show-masks", "--mask", mask, "--checkpoint", str(supervised_checkpoint), "--size", "32", "-n", "2"]
    assert main([*args, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: --mask {mask} needs a model's {kind} guidance, and checkpoint {supervised_checkpoint} holds a "
        "Supervised model (task 'supervised') that offers none; give a pretraining checkpoint (objectives hpm, ijepa, "
        "mae, simmim)" in err
    )
    assert "Traceback" not in err


def test_amt_is_drawn_on_the_cells_simmim_is_drawn_on(tmp_path, monkeypatch):
    from masklab.recipes import show_masks as module

    drawn = []
    real_overlay = module.overlay
    monkeypatch.setattr(module, "overlay", lambda images, states: drawn.append(states) or real_overlay(images, states))
    module.show_masks("amt", tmp_path / "amt.png", n=2, size=64, patch_size=8)
    module.show_masks("simmim", tmp_path / "simmim.png", n=2, size=64, patch_size=8)
    amt, simmim = drawn  # (B, 64, 64) pixel states: 4x4 cells of 16 px (2x2 patches of 8 px)
    for states, masked, thrown in ((amt, 8, 5), (simmim, 10, 0)):  # ceil(16 * .44), ceil(16 * .26); ceil(16 * .6)
        blocks = states.view(2, 4, 16, 4, 16)
        assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
        cells = blocks[:, :, 0, :, 0].flatten(1)
        assert (cells == MASKED).sum(1).tolist() == [masked] * 2 and (cells == THROWN).sum(1).tolist() == [thrown] * 2


def test_an_option_draws_attmask_on_simmims_cells(tmp_path, monkeypatch):
    from masklab.recipes import show_masks as module

    drawn = []
    real_overlay = module.overlay
    monkeypatch.setattr(module, "overlay", lambda images, states: drawn.append(states) or real_overlay(images, states))
    out = tmp_path / "attmask.png"
    argv = ["show-masks", "--mask", "attmask", "-n", "2", "--out", str(out), "--option", "mask_patch_size=16"]
    assert main(argv) == 0 and out.is_file()
    (states,) = drawn  # 4x4 cells of 16 px: 8 chosen (0.5), 1 revealed as a hint (0.1 of 8), 7 masked
    blocks = states.view(2, 4, 16, 4, 16)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    assert (blocks[:, :, 0, :, 0].flatten(1) == MASKED).sum(1).tolist() == [7, 7]


def test_bad_options_are_named(tmp_path):
    from masklab.recipes.show_masks import build_mask_stage

    with pytest.raises(SystemExit, match=r"--option takes KEY=VALUE \(a mask.\* config key\), got 'mask_patch_size'"):
        main(["show-masks", "--mask", "attmask", "--out", str(tmp_path / "a.png"), "--option", "mask_patch_size"])

    with pytest.raises(ValueError, match=r"mask 'attmask' has no option 'cell'; its options: ratio, mode, hint"):
        build_mask_stage("attmask", options={"cell": 16})


def test_hpm_picture_has_the_difficulty_map_and_masks_per_progress(tmp_path, monkeypatch):
    from masklab.recipes import show_masks as module

    drawn = {}
    monkeypatch.setattr(module, "draw_mask_picture", lambda rows, path, title: drawn.update(rows=rows, title=title))
    module.show_masks("hpm", tmp_path / "hpm.png", n=2, size=32, patch_size=4, progress=(0.0, 1.0))
    labels = [label for label, _ in drawn["rows"]]
    assert labels == ["image", "difficulty (random init)", "t=0: masked 48", "t=1: masked 48"]
    assert all(images.shape == (2, 3, 32, 32) for _, images in drawn["rows"])
    assert drawn["title"] == "hpm: ratio=0.75, random-init difficulty"
