import pytest
import torch

from masklab.pipeline import Batch
from masklab.transforms import (
    COLORS,
    MASKS,
    ColorNoiseMask,
    MaskContext,
    color_filter,
    color_noise,
    color_noise_mask,
)


def generator(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("color", COLORS)
@pytest.mark.parametrize("ratio,grid", [(0.75, (14, 14)), (0.5, (8, 8)), (0.4, (6, 10)), (0.0, (4, 4))])
def test_exact_counts_in_every_sample(color, ratio, grid, device):
    mask = color_noise_mask(32, grid, ratio, color, generator=generator(device), device=device)
    cells = grid[0] * grid[1]
    expected = round(cells * ratio)
    assert mask.grid == grid and mask.device == device
    assert mask.masked.flatten(1).sum(1).tolist() == [expected] * 32
    assert mask.counts == (cells - expected, expected, 0)


def test_the_visible_cells_are_each_samples_highest_noise(device):
    noise = color_noise(16, (14, 14), "green", generator=generator(device, 3), device=device).flatten(1)
    mask = color_noise_mask(16, (14, 14), 0.75, "green", generator=generator(device, 3), device=device)
    visible = mask.visible.flatten(1)
    lowest_visible = torch.where(visible, noise, torch.inf).amin(1)
    highest_masked = torch.where(visible, -torch.inf, noise).amax(1)
    assert (lowest_visible > highest_masked).all()


def radial_power(color: str, device) -> list[float]:
    """Mean power of the visible-cell pattern in four bands of spatial frequency (cycles per cell)."""
    mask = color_noise_mask(1000, (14, 14), 0.75, color, generator=generator(device, 1), device=device)
    visible = mask.visible.float().cpu()
    power = torch.fft.fft2(visible - visible.mean((1, 2), keepdim=True)).abs().pow(2).mean(0)
    f = torch.fft.fftfreq(14)
    radius = (f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).sqrt()
    bands = [(0, 0.15), (0.15, 0.3), (0.3, 0.45), (0.45, 0.75)]
    return [float(power[(radius > low) & (radius <= high)].mean()) for low, high in bands]


def test_each_colour_puts_its_masks_in_its_band_of_frequencies(device):
    red, green, blue, purple, white = (radial_power(c, device) for c in ("red", "green", "blue", "purple", "white"))
    assert red == sorted(red, reverse=True) and red[0] > 3 * white[0]  # low-pass: large regions
    assert blue == sorted(blue) and blue[0] < white[0]  # high-pass: scattered cells, no large regions
    assert max(green) in green[1:3] and green[0] < 0.7 * max(green)  # band-pass: a peak between
    assert min(purple[0], purple[3]) > max(purple[1], purple[2])  # band-stop: both ends, a dip between
    assert max(white) < 1.3 * min(white)  # unfiltered: flat


def test_the_noise_does_not_wrap_around_the_grid(device):
    # A circular filter would make the first and last columns neighbours; the noise is filtered larger and cropped.
    noise = color_noise(2000, (8, 8), "red", generator=generator(device), device=device).cpu()
    first, last, second = noise[:, :, 0].flatten(), noise[:, :, -1].flatten(), noise[:, :, 1].flatten()
    assert torch.corrcoef(torch.stack([first, second]))[0, 1] > 0.5
    assert torch.corrcoef(torch.stack([first, last]))[0, 1].abs() < 0.05


def test_red_green_blue_split_the_spectrum_and_purple_is_red_plus_blue():
    red, green, blue, purple = (color_filter((10, 12), c, (0.5, 1.0)) for c in ("red", "green", "blue", "purple"))
    assert torch.allclose(red + green + blue, torch.ones_like(red))
    assert torch.allclose(purple, red + blue)
    assert green[0, 0] == 0 and red[0, 0] == 1 and blue[0, 0] == 0


def test_one_seed_gives_one_mask_and_another_seed_another(device):
    stage = ColorNoiseMask(0.75, patch_size=4)
    images = torch.rand(8, 3, 32, 32, device=device)
    first, again, other = (stage(Batch(images=images, seed=s)).mask.states for s in (5, 5, 6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.device == device


def test_options_build_the_stage_with_its_colour():
    entry = MASKS["colormae"]
    assert entry.emits == "patch" and entry.guide is None
    stage = entry.build(entry.section(ratio=0.6, color="purple", sigma=[0.7, 1.5]), MaskContext(4, 32))
    assert isinstance(stage, ColorNoiseMask)
    assert (stage.ratio, stage.color, stage.sigma, stage.patch_size) == (0.6, "purple", (0.7, 1.5), 4)
    assert stage(Batch(images=torch.rand(2, 3, 32, 32), seed=0)).mask.counts == (26, 38, 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"color": "pink"}, r"color must be one of \('green', 'red', 'blue', 'purple', 'white'\), got 'pink'"),
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\), got 1.0"),
        ({"sigma": (1.0, 0.5)}, r"sigma must be two widths in cells with 0 < fine < coarse, got \(1.0, 0.5\)"),
        ({"sigma": (0.0, 1.0)}, r"0 < fine < coarse, got \(0.0, 1.0\)"),
        ({"patch_size": 0}, "patch_size must be positive, got 0"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ColorNoiseMask(**kwargs)


def test_an_image_the_patch_does_not_tile_is_refused():
    with pytest.raises(ValueError, match="image size 30x30 is not divisible by patch_size=4"):
        ColorNoiseMask(patch_size=4)(Batch(images=torch.rand(2, 3, 30, 30), seed=0))
