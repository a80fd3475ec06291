import pytest
import torch

from masklab.objectives import predictor_mlp, projection_mlp


def test_projection_layers_and_batch_norm():
    moco = projection_mlp(512, 2048, 128, bn=False)
    assert [type(m).__name__ for m in moco] == ["Linear", "ReLU", "Linear"]
    simsiam = projection_mlp(512, 64, 32, layers=3, last_bn=True)
    names = [type(m).__name__ for m in simsiam]
    assert names == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert not simsiam[-1].affine and simsiam(torch.rand(4, 512)).shape == (4, 32)


def test_predictor_maps_back_to_its_input_width():
    assert predictor_mlp(32, 8)(torch.rand(3, 32)).shape == (3, 32)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="layers must be positive, got 0"):
        projection_mlp(4, 4, 4, layers=0)
