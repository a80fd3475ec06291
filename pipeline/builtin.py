"""Built-in labelled datasets: offline, deterministic from a seed, small images.

``shapes`` draws eight shape classes with random colour, scale, rotation,
position and textured backgrounds, so the class is told by shape alone.
``digits`` is scikit-learn's bundled 8x8 handwritten digits, upsampled to RGB.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPE_CLASSES", "Shapes", "Digits", "BUILTIN", "builtin_dataset"]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "star", "ring", "semicircle", "arrow")
_SPLITS = {"train": 0, "test": 1}
_SUPERSAMPLE = 2
BACKGROUNDS = ("textured", "plain", "grey")
"""``textured``: stripes, checkerboards or smooth noise in two colours; ``plain``: one colour and faint noise;
``grey``: a grey shape on a plain grey background (no colour at all)."""


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _outline(name: str, rng: np.random.Generator) -> np.ndarray | None:
    """Polygon of a unit-size shape centred at 0 (``None`` for round shapes)."""
    if name == "square":
        return _rotate(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8, rng.uniform(-0.35, 0.35))
    if name == "triangle":
        return _regular(3, 1.0, rng.uniform(0, 2 * math.pi))
    if name == "cross":
        a, b = 1.0, 0.32
        pts = np.array(
            [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]]
        )
        return _rotate(pts, rng.uniform(-0.35, 0.35))
    if name == "star":
        outer = _regular(5, 1.0, rng.uniform(0, 2 * math.pi))
        phase = math.atan2(outer[0, 1], outer[0, 0]) + math.pi / 5
        inner = _regular(5, 0.42, phase)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if name == "arrow":
        pts = np.array([[-1, -0.25], [0.15, -0.25], [0.15, -0.7], [1, 0], [0.15, 0.7], [0.15, 0.25], [-1, 0.25]])
        return _rotate(pts, rng.uniform(0, 2 * math.pi))
    return None


def _texture(size: int, rng: np.random.Generator, plain: bool = False) -> np.ndarray:
    """A textured ``(size, size, 3)`` float background in [0, 1] (``plain``: one colour and faint noise)."""
    c0, c1 = rng.uniform(0.15, 0.85, 3), rng.uniform(0.15, 0.85, 3)
    if plain:
        return c0 + rng.normal(0, 0.03, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle and frequency
        theta, freq = rng.uniform(0, math.pi), rng.uniform(2, 6)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    elif kind == 1:  # checkerboard
        cells = rng.integers(3, 8)
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(float)
    else:  # smooth noise: upsampled random grid
        grid = rng.uniform(0, 1, (4, 4))
        t = np.asarray(Image.fromarray((grid * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)) / 255.0
    t = t[..., None] * 0.5 + 0.25  # keep the texture's contrast below the shape's
    return c0 * (1 - t) + c1 * t + rng.normal(0, 0.03, (size, size, 3))


def draw_shape(label: int, size: int, rng: np.random.Generator, background: str = "textured") -> np.ndarray:
    """Render one ``(size, size, 3)`` uint8 image of class ``label`` on a ``background`` of :data:`BACKGROUNDS`."""
    return _render(label, size, rng, background)[0]


def _render(label: int, size: int, rng: np.random.Generator, background: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image, coverage)``: :func:`draw_shape`'s image and the ``(size, size)`` float share of each pixel the
    shape covers (its drawn mask, area-averaged to ``size``)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    big = size * _SUPERSAMPLE
    grey = background == "grey"
    background = _texture(big, rng, plain=background != "textured")
    if grey:
        background = background.mean(axis=2, keepdims=True).repeat(3, axis=2)
    mean = background.mean(axis=(0, 1))
    # A colour far from the background's mean so the shape is always visible.
    for _ in range(20):
        colour = rng.uniform(0, 1, 3)
        if grey:
            colour = np.full(3, colour.mean())
        if np.abs(colour - mean).sum() > 0.9:
            break
    radius = rng.uniform(0.22, 0.42) * big
    cx = rng.uniform(radius, big - radius)
    cy = rng.uniform(radius, big - radius)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    name = SHAPE_CLASSES[label]
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if name == "circle":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        draw.ellipse(box, fill=255)
        r = radius * 0.55
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
    elif name == "semicircle":
        start = rng.uniform(0, 360)
        draw.pieslice(box, start, start + 180, fill=255)
    else:
        pts = _outline(name, rng) * radius + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=255)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    image = background * (1 - alpha) + colour * alpha
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    coverage = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64) / 255.0
    return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS)), coverage


class Shapes:
    """Procedurally drawn shapes: 8 classes told apart by shape, not colour.

    Each sample is drawn from its own generator seeded by ``(seed, split, i)``,
    so the dataset is deterministic, indexable in any order, and the splits
    never share an image. Labels cycle through the classes (balanced).

    Args:
        size: image side in pixels (32 to 64 suits the demo and the tests).
        length: number of images.
        seed: the dataset's seed.
        split: ``"train"`` or ``"test"``.
        background: ``"textured"`` (the default: stripes, checkerboards or
            smooth noise behind the shape, a nuisance the encoder must learn to
            ignore), ``"plain"`` (one colour and faint noise) or ``"grey"``
            (a grey shape on a plain grey background: no colour, so an image
            cannot be told from the others by its colours; the study's data,
            see ``masklab.tools.study``). The shape's colour is drawn until it
            lies far from the background's mean (20 tries, then the last is
            kept): in grey, where both are means of three uniform draws, about
            one image in ten keeps a closer grey (on the first 2000 test images:
            6% within 40 grey levels of the background, 3% within 20). ``builtin:shapes-plain`` and
            ``builtin:shapes-grey`` name the last two as data sources.

    Examples:
        >>> ds = Shapes(size=32, length=16)
        >>> image, label = ds[3]
        >>> image.shape, image.dtype.name, label, ds.classes[label]
        ((32, 32, 3), 'uint8', 3, 'cross')
    """

    classes = SHAPE_CLASSES

    def __init__(
        self, size: int = 32, length: int = 4000, seed: int = 0, split: str = "train", background: str = "textured"
    ) -> None:
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not 8 <= size <= 512:
            raise ValueError(f"size must be in [8, 512], got {size}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.size, self.length, self.seed, self.split = size, length, seed, split
        self.background = background

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self._render(i)[0], i % self.length % len(SHAPE_CLASSES)

    def coverage(self, i: int) -> np.ndarray:
        """The ``(size, size)`` share in [0, 1] of each pixel of image ``i`` that its shape covers: where the
        object is, for measuring where a mask lands (the study's mask placement).

        Examples:
            >>> ds = Shapes(size=32, length=8, background="grey")
            >>> cover = ds.coverage(0)
            >>> cover.shape, bool(0 < cover.mean() < 1), float(cover.max())
            ((32, 32), True, 1.0)
        """
        return self._render(i)[1]

    def _render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} images")
        i %= self.length
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], i])
        return _render(i % len(SHAPE_CLASSES), self.size, rng, self.background)


class Digits:
    """scikit-learn's bundled handwritten digits (1797 images, 10 classes), as RGB.

    The 8x8 grey images are upsampled (bicubic) to ``size`` and repeated over
    three channels. A seeded permutation splits them 80/20 into train and test.

    Args:
        size: output side in pixels.
        seed: seed of the train/test split.
        split: ``"train"``, ``"test"`` or ``"all"``.
    """

    classes = tuple(str(d) for d in range(10))

    def __init__(self, size: int = 32, seed: int = 0, split: str = "train") -> None:
        from sklearn.datasets import load_digits

        if split not in (*_SPLITS, "all"):
            raise ValueError(f"split must be one of ['all', 'test', 'train'], got {split!r}")
        digits = load_digits()
        order = np.random.default_rng(seed).permutation(len(digits.target))
        cut = int(round(0.8 * len(order)))
        keep = {"train": order[:cut], "test": order[cut:], "all": np.arange(len(order))}[split]
        self.size = size
        self._images = digits.images[keep]
        self._labels = digits.target[keep].astype(np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        grey = (self._images[i] / 16.0 * 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(grey).resize((self.size, self.size), Image.BICUBIC))
        return np.repeat(big[..., None], 3, axis=2), int(self._labels[i])


def _shapes_on(background: str) -> Callable[..., Shapes]:
    """``Shapes`` with another default ``background``, keeping its ``classes``."""
    build = functools.partial(Shapes, background=background)
    build.classes = Shapes.classes
    return build


BUILTIN: dict[str, Callable[..., object]] = {
    "shapes": Shapes,
    "shapes-plain": _shapes_on("plain"),
    "shapes-grey": _shapes_on("grey"),
    "digits": Digits,
}
"""Each built-in dataset by name; each has ``classes``."""


def builtin_dataset(name: str, **kwargs: Any) -> Shapes | Digits:
    """Build a built-in dataset by name (``"shapes"``, ``"shapes-plain"``, ``"shapes-grey"`` or ``"digits"``)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {sorted(BUILTIN)}")
    return BUILTIN[name](**kwargs)
