import pytest
import torch

from masklab.transforms import MASKED, THROWN, VISIBLE, PatchMask, erase_patches


def example(device):
    # 2 samples on a 2x3 grid: 3 visible, 2 masked, 1 thrown each.
    return PatchMask(torch.tensor([[[0, 1, 2], [0, 1, 0]], [[1, 0, 0], [2, 0, 1]]], device=device))


def test_counts_and_gather_indices(device):
    m = example(device)
    assert m.counts == (3, 2, 1) and m.grid == (2, 3) and m.num_cells == 6 and m.device == device
    assert m.ids_keep.tolist() == [[0, 3, 5], [1, 2, 4]]
    assert m.ids_masked.tolist() == [[1, 4], [0, 5]]
    assert m.ids_thrown.tolist() == [[2], [3]]
    restore = m.ids_restore
    assert torch.equal(torch.gather(m.ids_shuffle, 1, restore), torch.arange(6, device=device).expand(2, 6))


def test_gathering_tokens_with_the_indices_round_trips(device):
    m = example(device)
    tokens = torch.arange(12.0, device=device).view(2, 6, 1)
    shuffled = torch.gather(tokens, 1, m.ids_shuffle[..., None])
    assert torch.equal(torch.gather(shuffled, 1, m.ids_restore[..., None]), tokens)


def test_inconsistent_counts_raise_naming_the_samples(device):
    with pytest.raises(ValueError, match=r"sample 0 has .* = \(3, 1, 0\), sample 1 has \(2, 2, 0\)"):
        PatchMask(torch.tensor([[[0, 0], [0, 1]], [[0, 1], [1, 0]]], device=device))


def test_unknown_state_and_bad_shape_raise(device):
    with pytest.raises(ValueError, match="got 3"):
        PatchMask(torch.tensor([[[0, 3]]], device=device))
    with pytest.raises(ValueError, match=r"\(B, Gh, Gw\)"):
        PatchMask(torch.zeros(4, 4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="do not add up"):
        PatchMask(torch.zeros(1, 2, 2, dtype=torch.long, device=device), counts=(3, 0, 0))


def test_to_pixels_repeats_each_cell(device):
    m = example(device)
    pixels = m.to_pixels(4, 6)
    assert pixels.shape == (2, 4, 6) and pixels.device == device
    assert torch.equal(pixels[:, ::2, ::2], m.states)
    assert (pixels == THROWN).sum() == 2 * 4
    with pytest.raises(ValueError, match=r"5x6 is not divisible by the 2x3 mask grid"):
        m.to_pixels(5, 6)


def test_regrid_up_and_back_down(device):
    m = example(device)
    fine = m.regrid(4, 6)
    assert fine.counts == (12, 8, 4)
    back = fine.regrid(2, 3)
    assert torch.equal(back.states, m.states) and back.counts == m.counts
    with pytest.raises(ValueError, match="mix states"):
        PatchMask(torch.tensor([[[0, 1], [0, 1]]], device=device)).regrid(1, 1)
    with pytest.raises(ValueError, match="neither divides"):
        m.regrid(3, 3)


def test_erase_replaces_hidden_patches_only(device):
    m = PatchMask(torch.tensor([[[VISIBLE, MASKED], [THROWN, VISIBLE]]], device=device))
    images = torch.ones(1, 3, 4, 4, device=device)
    fill = torch.tensor([0.1, 0.2, 0.3], device=device)
    out = erase_patches(images, m, fill=fill.view(1, 3, 1, 1))
    assert torch.equal(out[0, :, :2, :2], images[0, :, :2, :2])
    assert torch.allclose(out[0, :, :2, 2:], fill.view(3, 1, 1).expand(3, 2, 2))
    assert torch.allclose(out[0, 1, 2:, :2], torch.full((2, 2), 0.2, device=device))
    assert images.min() == 1


def test_to_keeps_counts_and_repr_names_them(device):
    m = example(device).to("cpu")
    assert m.counts == (3, 2, 1) and m.device == torch.device("cpu")
    assert example("cpu").to(device).device == device
    assert "visible=3, masked=2, thrown=1" in repr(m)
