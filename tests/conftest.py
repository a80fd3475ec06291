import os
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from masklab.pipeline import Shapes, ffcv_available

DEVICE_VARIABLE = "MASKLAB_TEST_DEVICE"


def device_from_env(environ: Mapping[str, str]) -> torch.device:
    """The device ``MASKLAB_TEST_DEVICE`` names (``cpu`` when unset), checked by making a tensor there.

    The device is the tensor's, index included (``cuda`` gives ``cuda:0``), so it compares equal to
    ``tensor.device``.

    Raises:
        ValueError: the value is no torch device, or torch cannot put a tensor on it (no GPU, no driver).
    """
    name = environ.get(DEVICE_VARIABLE, "cpu").strip() or "cpu"
    try:
        device = torch.zeros(1, device=torch.device(name)).device
    except (RuntimeError, AssertionError) as error:  # torch raises AssertionError when built without CUDA
        raise ValueError(f"{DEVICE_VARIABLE}={name!r} is not a device this torch can use: {error}") from None
    return device


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # pytest-xdist (make test): share the cores between the workers instead of each taking all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        config.masklab_device = device_from_env(os.environ)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_collection_modifyitems(config, items):
    # The slow tests first, so that with pytest-xdist (make test) the long ones start early and the short ones
    # fill the workers' ends instead of one long test running alone at the end. Stable: same order within each.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    # A test that takes the ``device`` fixture runs on MASKLAB_TEST_DEVICE: ``pytest -m device`` selects them.
    off_cpu = config.masklab_device.type != "cpu"
    cpu_only = pytest.mark.skip(reason=f"CPU only; {DEVICE_VARIABLE}={config.masklab_device}")
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)
        if off_cpu and item.get_closest_marker("cpu_only") is not None:
            item.add_marker(cpu_only)
    if ffcv_available():
        return
    skip = pytest.mark.skip(reason="ffcv is not installed (make setup installs it)")
    for item in items:
        if "ffcv" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """Where device-aware tests put their tensors, generators and models: ``MASKLAB_TEST_DEVICE`` (default cpu)."""
    return pytestconfig.masklab_device


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
