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
