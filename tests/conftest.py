import numpy as np
import pytest
import torch

from masklab.pipeline import Shapes, ffcv_available


def pytest_collection_modifyitems(config, items):
    if ffcv_available():
        return
    skip = pytest.mark.skip(reason="ffcv is not installed (make setup installs it)")
    for item in items:
        if "ffcv" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_small():
    """203 shapes images at 32 px: an odd count, so shards and last batches are uneven."""
    return Shapes(size=32, length=203, seed=0)


@pytest.fixture(scope="session")
def shapes_beton(tmp_path_factory, shapes_small):
    if not ffcv_available():
        pytest.skip("ffcv is not installed")
    from masklab.pipeline import write_dataset

    path = tmp_path_factory.mktemp("data") / "shapes.beton"
    write_dataset(shapes_small, path, num_workers=1, progress=False)
    return path


@pytest.fixture
def tensor_dataset():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(40) % 4
    return torch.utils.data.TensorDataset(images, labels)


def as_numpy(batch):
    return {k: getattr(batch, k).cpu().numpy() for k in ("images", "labels", "index", "crops", "flips")}


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
