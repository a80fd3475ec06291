import hashlib

import numpy as np
import pytest

from masklab.pipeline import SHAPE_CLASSES, Digits, Shapes, builtin_dataset


def test_shapes_are_deterministic_balanced_and_split_apart():
    a, b = Shapes(size=32, length=40, seed=3), Shapes(size=32, length=40, seed=3)
    assert all(np.array_equal(a[i][0], b[i][0]) for i in range(0, 40, 7))
    labels = [a[i][1] for i in range(40)]
    assert len(SHAPE_CLASSES) >= 8
    assert np.bincount(labels).tolist() == [5] * 8
    test = Shapes(size=32, length=40, seed=3, split="test")
    assert not np.array_equal(a[0][0], test[0][0])
    assert not np.array_equal(a[0][0], Shapes(size=32, length=40, seed=4)[0][0])


def test_shape_images_are_rgb_uint8_at_the_asked_size():
    image, label = Shapes(size=48, length=8)[5]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and label == 5
    assert image.std() > 10  # drawn, not blank


def test_backgrounds_keep_the_shape_and_label_and_grey_has_no_colour():
    textured, plain, grey = (Shapes(size=32, length=8, background=b) for b in ("textured", "plain", "grey"))
    for i in range(8):
        image, label = grey[i]
        assert label == textured[i][1] == plain[i][1] == i
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
        assert image.std() > 10  # the shape shows
        corner = plain[i][0][:3, :3].reshape(-1, 3).astype(float)
        assert corner.std(axis=0).max() < 12  # one colour and faint noise
    assert not np.array_equal(textured[0][0], plain[0][0])
    # The default is the textured data the demo has always used: the same pixels as before the option.
    assert hashlib.sha256(Shapes(size=32, length=8)[3][0].tobytes()).hexdigest()[:16] == "146a8f8cdcba83e9"
    assert builtin_dataset("shapes-grey", size=32, length=8)[2][0].tobytes() == grey[2][0].tobytes()
    with pytest.raises(ValueError, match=r"background must be one of \('textured', 'plain', 'grey'\), got 'noisy'"):
        Shapes(background="noisy")


def test_digits_upsampled_to_rgb():
    train, test = Digits(size=32), Digits(size=32, split="test")
    assert len(train) + len(test) == 1797
    image, label = train[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 2])
    assert 0 <= label < 10 and len(Digits.classes) == 10


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match=r"unknown built-in dataset 'mnist'"):
        builtin_dataset("mnist")
    with pytest.raises(ValueError, match=r"split must be one of .* got 'val'"):
        Shapes(split="val")
