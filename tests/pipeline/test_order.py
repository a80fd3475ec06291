import numpy as np
import pytest

from masklab.pipeline import epoch_order


@pytest.mark.parametrize("n,world", [(203, 2), (10, 3), (8, 4), (1, 2)])
def test_ranks_are_disjoint_and_cover_the_dataset(n, world):
    shards = [epoch_order(n, seed=0, epoch=1, rank=r, world_size=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    merged = np.concatenate(shards)
    assert set(merged.tolist()) == set(range(n))
    # Only the padding repeats, and there are fewer than world_size of them.
    assert len(merged) - n < world
    first_seen = [set(s[: n // world].tolist()) for s in shards]
    for a in range(world):
        for b in range(a + 1, world):
            assert not first_seen[a] & first_seen[b]


def test_order_depends_on_seed_and_epoch_only():
    a = epoch_order(100, seed=1, epoch=2)
    assert np.array_equal(a, epoch_order(100, seed=1, epoch=2))
    assert not np.array_equal(a, epoch_order(100, seed=1, epoch=3))
    assert not np.array_equal(a, epoch_order(100, seed=2, epoch=2))
    assert sorted(a.tolist()) == list(range(100))


def test_sequential_is_the_identity():
    assert epoch_order(5, seed=3, epoch=9, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_bad_rank_is_an_error():
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        epoch_order(5, seed=0, epoch=0, rank=2, world_size=2)


def _hand_rule(n, seed, epoch, shuffle, rank, world):
    """The rule epoch_order wrote by hand before it used DistributedSampler."""
    import torch

    from masklab.pipeline import derive_seed

    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))).numpy()
    else:
        order = np.arange(n, dtype=np.int64)
    total = -(-n // world) * world
    if total > n:
        order = np.concatenate([order, np.resize(order, total - n)])
    return order[rank:total:world]


@pytest.mark.parametrize("n,world", [(203, 2), (10, 3), (8, 4), (1, 2), (2, 5), (1000, 8)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_the_order_is_distributed_samplers_and_the_one_written_by_hand_before(n, world, shuffle):
    for rank in range(world):
        got = epoch_order(n, seed=7, epoch=3, shuffle=shuffle, rank=rank, world_size=world)
        assert got.dtype == np.int64
        assert got.tolist() == _hand_rule(n, 7, 3, shuffle, rank, world).tolist()
