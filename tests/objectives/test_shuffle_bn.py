import pytest
import torch

from masklab.objectives import shuffle_bn

ORDER = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])  # chunks of 2 at splits=4: {5, 0}, {7, 2}, {1, 6}, {3, 4}


def batch_norm_by_hand(rows: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = rows.mean(dim=0)
    var = ((rows - mean) ** 2).mean(dim=0)  # batch norm's biased variance
    return (rows - mean) / (var + eps).sqrt()


@pytest.mark.parametrize("splits", [2, 4])
def test_each_chunk_is_normalised_on_its_own_and_rows_come_back_in_order(splits):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    bn = torch.nn.BatchNorm1d(3, affine=False).train()
    got = shuffle_bn(bn, x, ORDER, splits)
    want = torch.empty_like(x)
    for chunk in ORDER.tensor_split(splits):
        want[chunk] = batch_norm_by_hand(x[chunk])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, batch_norm_by_hand(x), atol=1e-3)  # not the whole batch's statistics


def test_order_is_restored_for_a_per_sample_function():
    x = torch.arange(8.0).view(8, 1)
    assert shuffle_bn(lambda t: t * 10, x, ORDER, splits=4).flatten().tolist() == [10.0 * i for i in range(8)]


def test_one_split_is_one_call_on_the_batch_as_it_is():
    calls = []
    x = torch.randn(6, 2)
    out = shuffle_bn(lambda t: calls.append(t) or t + 1, x, torch.randperm(6), splits=1)
    assert len(calls) == 1 and calls[0] is x and torch.equal(out, x + 1)


def test_bad_splits_and_orders_are_errors_that_say_what_is_allowed():
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match="splits must be at least 1, got 0"):
        shuffle_bn(torch.nn.Identity(), x, torch.arange(6), 0)
    with pytest.raises(ValueError, match=r"order must be a permutation of the batch, shape \(6,\); got \(5,\)"):
        shuffle_bn(torch.nn.Identity(), x, torch.arange(5), 2)
    with pytest.raises(ValueError, match=r"4 batch-norm splits need a batch of at least 8 \(2 per chunk\), got 6"):
        shuffle_bn(torch.nn.Identity(), x, torch.arange(6), 4)
