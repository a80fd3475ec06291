import pytest
import torch

from masklab.pipeline import Batch, CropParams, RandomResizedCrop, apply_crop, compose_crops
from masklab.transforms import Normalize, Views


def test_views_have_shapes_boxes_and_follow_the_seed(device):
    b = Batch(images=torch.rand(4, 3, 32, 32, device=device), seed=1)
    out = Views(2, "simclr", size=16)(b)
    assert len(out.views) == 2 and out.views[0].shape == (4, 3, 16, 16)
    assert all(v.min() >= 0 and v.max() <= 1 for v in out.views)
    assert len(out.view_crops) == len(out.view_flips) == 2
    again = Views(2, "simclr", size=16)(b)
    assert all(torch.equal(x, y) for x, y in zip(out.views, again.views, strict=True))
    assert not torch.equal(out.views[0], out.views[1])
    assert out.images is b.images


def test_mae_preset_is_crop_and_flip_only(device):
    images = torch.rand(6, 3, 16, 16, device=device)
    out = Views(1, "mae")(Batch(images=images, seed=0))
    params = CropParams(out.view_crops[0], out.view_flips[0])
    torch.testing.assert_close(out.views[0], apply_crop(images, params, (16, 16)))


def test_view_boxes_are_in_source_pixels_when_the_loader_cropped(device):
    # Smooth images, so two resamplings agree with one wherever the boxes agree.
    source = torch.nn.functional.interpolate(
        torch.rand(5, 3, 5, 5, device=device), size=(40, 40), mode="bicubic", align_corners=True
    )
    cropped = RandomResizedCrop(20, scale=(0.3, 0.9))(Batch(images=source, seed=3))
    out = Views(2, "mae", size=8)(cropped)
    for view, boxes, flips in zip(out.views, out.view_crops, out.view_flips, strict=True):
        direct = apply_crop(source, CropParams(boxes, flips), (8, 8))
        # Two bilinear resamplings against one: close, and far closer than another sample's region.
        assert (direct - view).abs().mean() < 0.02
        assert (direct - view.roll(1, 0)).abs().mean() > 0.1
        mirrored = apply_crop(source, CropParams(boxes, ~flips), (8, 8))
        assert (mirrored - view).abs().mean() > 0.05


def test_compose_crops_flips_and_scales(device):
    outer = CropParams(torch.tensor([[10.0, 20.0, 30.0, 60.0]], device=device), torch.tensor([True], device=device))
    inner = CropParams(torch.tensor([[0.0, 0.0, 5.0, 10.0]], device=device), torch.tensor([False], device=device))
    composed = compose_crops(outer, (20, 10), inner)
    # The inner box's left 5 of 10 px is the outer crop's right half (flipped): x in [20, 30).
    assert composed.boxes.tolist() == [[20.0, 20.0, 30.0, 40.0]]
    assert composed.flips.tolist() == [True]


def test_byol_preset_is_asymmetric_and_normalize_covers_views(device):
    views = Views(2, "byol")
    assert views.recipes[0].blur_p == 1.0 and views.recipes[1].solarize_p == 0.2
    out = Normalize((0.5,) * 3, (0.5,) * 3)(views(Batch(images=torch.rand(2, 3, 16, 16, device=device), seed=0)))
    assert out.views[0].min() < 0


def test_bad_view_arguments():
    with pytest.raises(ValueError, match=r"unknown preset 'dino'"):
        Views(2, "dino")
    with pytest.raises(ValueError, match=r"n must be at least 1, got 0"):
        Views(0)
