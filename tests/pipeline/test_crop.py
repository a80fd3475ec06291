import math

import pytest
import torch

from masklab.pipeline import Batch, CropParams, RandomResizedCrop, apply_crop, random_resized_crop_params


def test_boxes_respect_bounds_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    params = random_resized_crop_params(2000, (48, 64), scale=(0.2, 0.6), ratio=(0.5, 2.0), generator=g)
    x0, y0, x1, y1 = params.boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 48).all()
    w, h = x1 - x0, y1 - y0
    assert torch.equal(w, w.round()) and torch.equal(x0, x0.round())
    area = w * h / (48 * 64)
    # Sides are rounded to whole pixels, so allow a pixel of slack each way.
    slack_area = (w + 1) * (h + 1) / (48 * 64)
    assert (slack_area >= 0.2).all() and (area <= 0.6 + (w + h + 1) / (48 * 64)).all()
    aspect = w / h
    assert (aspect >= 0.5 * (1 - 2 / h.min())).all() and (aspect <= 2.0 * (1 + 2 / h.min())).all()
    assert 0.4 < params.flips.float().mean() < 0.6


def test_one_seed_gives_one_draw():
    a = random_resized_crop_params(8, (32, 32), generator=torch.Generator().manual_seed(3))
    b = random_resized_crop_params(8, (32, 32), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips)


def test_a_box_of_the_output_size_is_an_exact_slice_and_flip_mirrors_it():
    images = torch.rand(2, 3, 32, 32)
    boxes = torch.tensor([[4.0, 8.0, 20.0, 24.0], [0.0, 0.0, 16.0, 16.0]])
    out = apply_crop(images, CropParams(boxes, torch.tensor([False, True])), (16, 16))
    torch.testing.assert_close(out[0], images[0, :, 8:24, 4:20])
    torch.testing.assert_close(out[1], images[1, :, 0:16, 0:16].flip(-1))


def test_uint8_input_is_scaled_to_unit_range():
    images = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    out = apply_crop(images, CropParams(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([False])), (4, 4))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones(1, 3, 4, 4))


def test_stage_records_boxes_and_leaves_input_alone():
    images = torch.rand(4, 3, 16, 16)
    batch = Batch(images=images.clone(), seed=1)
    out = RandomResizedCrop(8)(batch)
    assert torch.equal(batch.images, images)
    assert out.images.shape == (4, 3, 8, 8)
    assert out.crops.shape == (4, 4) and out.flips.dtype == torch.bool
    assert out.source_sizes.tolist() == [[16, 16]] * 4


def test_no_scale_means_the_whole_image():
    out = RandomResizedCrop(8, scale=None, flip_p=0.0)(Batch(images=torch.rand(3, 3, 16, 16)))
    assert out.crops.tolist() == [[0.0, 0.0, 16.0, 16.0]] * 3
    assert not out.flips.any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scale": (0.0, 1.0)}, r"scale .*\(0.0, 1.0\)"),
        ({"scale": (0.5, 1.5)}, r"scale .*\(0.5, 1.5\)"),
        ({"ratio": (2.0, 1.0)}, r"ratio .*\(2.0, 1.0\)"),
        ({"flip_p": 1.5}, r"flip_p .*1.5"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomResizedCrop(8, **kwargs)


def test_fallback_is_a_centre_crop_with_clamped_aspect():
    # A 1:8 strip cannot fit any 3/4..4/3 crop of at least 90% of its area.
    g = torch.Generator().manual_seed(0)
    params = random_resized_crop_params(4, (80, 10), scale=(0.9, 1.0), generator=g)
    w = params.boxes[:, 2] - params.boxes[:, 0]
    h = params.boxes[:, 3] - params.boxes[:, 1]
    assert torch.all(w == 10) and torch.all(h == math.floor(10 / 0.75 + 0.5))
