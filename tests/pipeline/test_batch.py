import pytest
import torch

from masklab.pipeline import Batch


def test_replace_shares_untouched_tensors_and_leaves_the_original():
    batch = Batch(images=torch.zeros(2, 3, 4, 4), labels=torch.tensor([0, 1]))
    new = batch.replace(images=torch.ones(2, 3, 4, 4))
    assert batch.images.sum() == 0
    assert new.labels is batch.labels
    assert new.images.sum() == 2 * 3 * 16


def test_rows_must_match_images():
    with pytest.raises(ValueError, match=r"labels has 3 rows but images has 2"):
        Batch(images=torch.zeros(2, 3, 4, 4), labels=torch.zeros(3))


def test_images_must_be_4d():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(3, 4, 4\)"):
        Batch(images=torch.zeros(3, 4, 4))


def test_to_moves_nested_tensors_and_keeps_meta():
    batch = Batch(
        images=torch.zeros(1, 3, 2, 2, dtype=torch.float64),
        views=[torch.zeros(1, 3, 2, 2)],
        mix={"lam": torch.ones(1)},
        seed=7,
        source_sizes=torch.tensor([[2, 2]]),
    )
    moved = batch.to("meta")
    assert moved.images.device.type == "meta"
    assert moved.views[0].device.type == "meta"
    assert moved.mix["lam"].device.type == "meta"
    assert moved.seed == 7 and moved.source_sizes.device.type == "meta"
    assert batch.images.device.type == "cpu"


def test_with_extras_adds_without_mutating():
    batch = Batch(images=torch.zeros(1, 3, 2, 2), extras={"a": 1})
    new = batch.with_extras(b=2)
    assert batch.extras == {"a": 1}
    assert new.extras == {"a": 1, "b": 2}
