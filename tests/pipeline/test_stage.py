import pytest
import torch
from torchdata.nodes import Loader as NodeLoader

from masklab.pipeline import Batch, Chain, Lambda, Stage, batch_generator, derive_seed, stage_node


class AddNoise(Stage):
    """A random stage written the way masklab stages are: draw, then apply."""

    def make_params(self, batch, generator):
        return torch.rand(batch.images.shape, generator=generator, device=batch.device)

    def apply(self, batch, params):
        return batch.replace(images=batch.images + params)


def make_batch(seed=1):
    return Batch(images=torch.zeros(4, 3, 8, 8), labels=torch.arange(4), seed=seed)


def test_chain_runs_stages_in_order_on_cpu():
    chain = Chain([Lambda(lambda b: b.replace(images=b.images + 1)), lambda b: b.replace(images=b.images * 3)])
    out = chain(make_batch())
    assert torch.equal(out.images, torch.full((4, 3, 8, 8), 3.0))


def test_chain_is_deterministic_from_the_batch_seed_and_does_not_mutate():
    chain = Chain([AddNoise(), AddNoise()])
    batch = make_batch(seed=5)
    a, b = chain(batch), chain(batch)
    assert torch.equal(a.images, b.images)
    assert batch.images.abs().sum() == 0
    assert a.seed == 5
    assert not torch.equal(chain(make_batch(seed=6)).images, a.images)


def test_appending_a_stage_keeps_earlier_draws():
    one = Chain([AddNoise()])(make_batch())
    two = Chain([AddNoise(), Lambda(lambda b: b)])(make_batch())
    assert torch.equal(one.images, two.images)


def test_stages_at_different_positions_draw_differently():
    out = Chain([AddNoise(), Lambda(lambda b: b.with_extras(first=b.images)), AddNoise()])(make_batch())
    first = out.extras["first"]
    assert not torch.equal(out.images - first, first)


def test_chain_names_a_stage_that_returns_no_batch():
    with pytest.raises(TypeError, match=r"stage 1 \(Lambda\) returned Tensor"):
        Chain([Lambda(lambda b: b), Lambda(lambda b: b.images)])(make_batch())


def test_chain_rejects_non_callables():
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        Chain([3])


def test_batch_generator_lives_on_the_batch_device_and_follows_the_seed():
    batch = make_batch(seed=3)
    g1, g2 = batch_generator(batch), batch_generator(batch)
    assert g1.device == batch.device
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
    assert batch_generator(make_batch(seed=None)) is None


def test_derive_seed_is_order_sensitive_and_fits_in_63_bits():
    seeds = {derive_seed(0, e, s, r) for e in range(3) for s in range(3) for r in range(2)}
    assert len(seeds) == 18
    assert all(0 <= s < 2**63 for s in seeds)


def test_stage_node_composes_with_torchdata_nodes():
    batches = [make_batch(seed=i) for i in range(3)]
    node = stage_node(batches, [AddNoise()], prefetch=2)
    out = list(NodeLoader(node))
    expected = [Chain([AddNoise()])(b) for b in batches]
    assert len(out) == 3
    for got, want in zip(out, expected, strict=True):
        assert torch.equal(got.images, want.images)
