"""Where images come from for :func:`~masklab.pipeline.write_dataset`: folders (with or without class
subfolders), path lists, Hugging Face datasets and WebDataset tar shards.

Every source is map-style: ``len(source)``, ``source[i] -> (HWC uint8 array, label)``, ``classes``
(names, position = label; empty when the source has no labels, whose label is then :data:`UNLABELLED`)
and ``describe(i)`` (what a skipped item is called in the report). Sources are pickled into FFCV's
writer processes, so they hold paths and offsets, never open files.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_MODES",
    "UNLABELLED",
    "HFDataset",
    "ImageFolder",
    "PathList",
    "TarShards",
    "expand_shards",
    "is_hf_dataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
UNLABELLED = -1
"""The label of an image whose source has none (self-supervised data)."""
LABEL_MODES = ("auto", "folders", "none")
"""How a folder's images get labels: ``folders`` (one subfolder per class), ``none`` (every image
below the folder, unlabelled), ``auto`` (``folders`` when the folder holds subfolders and no image of
its own, else ``none``)."""


def _decode(data: bytes | str | os.PathLike) -> np.ndarray:
    from .writer import to_hwc_uint8

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        # A full decode: truncated files pass Image.verify() but fail here.
        return to_hwc_uint8(image)


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class _ImageFiles:
    """Image files with labels: ``samples`` is a list of ``(path, label)``."""

    samples: list[tuple[Path, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, i: int) -> str:
        """How an error names sample ``i`` (its file, row or shard and key)."""
        return str(self.samples[i][0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        return _decode(path), label


class ImageFolder(_ImageFiles):
    """Images below ``root``: in class subfolders (``root/<class>/...``, labels follow sorted class
    names), or anywhere below it without labels (see :data:`LABEL_MODES`).

    Raises:
        ValueError: an unknown ``labels``, no class subfolder with ``folders``, or no image at all.
    """

    def __init__(self, root: str | os.PathLike, labels: str = "auto") -> None:
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        root = Path(root)
        subfolders = sorted(p.name for p in root.iterdir() if p.is_dir())
        own_images = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if labels == "auto":
            labels = "folders" if subfolders and not own_images else "none"
        self.mode = labels
        if labels == "folders":
            if not subfolders:
                raise ValueError(f"image folder {root} has no class subfolders (expected {root}/<class>/<image>)")
            self.classes = subfolders
            self.samples = [
                (path, label) for label, name in enumerate(self.classes) for path in _images_below(root / name)
            ]
        else:
            self.classes = []
            self.samples = [(path, UNLABELLED) for path in _images_below(root)]


class PathList(_ImageFiles):
    """A text file naming one image per line, optionally followed by an integer label.

    ``path`` or ``path<whitespace>label``; paths relative to the list's folder; blank lines and
    lines starting with ``#`` are skipped. Either every line has a label or none has (then the
    images are unlabelled).

    Raises:
        ValueError: a label that is not a non-negative integer, or labels on some lines only (the
            line is named).
    """

    def __init__(self, list_file: str | os.PathLike) -> None:
        list_file = Path(list_file)
        entries: list[tuple[Path, int | None, int]] = []
        for number, line in enumerate(list_file.read_text().splitlines(), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            name, _, rest = text.rpartition(" ") if "\t" not in text else text.rpartition("\t")
            label: int | None = None
            if name and rest.strip().lstrip("-").isdigit():
                label = int(rest)
                if label < 0:
                    raise ValueError(f"{list_file}:{number}: label {label} is negative; labels are 0, 1, ...")
            else:
                name = text
            path = Path(name.strip())
            entries.append((path if path.is_absolute() else list_file.parent / path, label, number))
        labelled = {label is not None for _, label, _ in entries}
        if len(labelled) > 1:
            first = next(n for _, label, n in entries if (label is None) != (entries[0][1] is None))
            raise ValueError(f"{list_file}:{first}: some lines have a label and some do not; give all or none")
        self.samples = [(path, UNLABELLED if label is None else label) for path, label, _ in entries]
        top = max((label for _, label in self.samples), default=UNLABELLED)
        self.classes = [str(c) for c in range(top + 1)]


def is_hf_dataset(source: Any) -> bool:
    """Whether ``source`` is a Hugging Face ``datasets.Dataset`` (without importing ``datasets``)."""
    return type(source).__module__.startswith("datasets.") and hasattr(source, "column_names")


class HFDataset:
    """A Hugging Face ``datasets.Dataset``: images from ``image_column`` (PIL images, arrays, or
    ``{"bytes", "path"}`` records), labels from ``label_column`` (``None``: unlabelled). Class names
    come from a ``ClassLabel`` feature where there is one.

    Raises:
        ValueError: a column that is not in the dataset (the columns are named).
    """

    def __init__(self, dataset: Any, image_column: str = "image", label_column: str | None = "label") -> None:
        columns = list(dataset.column_names)
        for role, column in (("image", image_column), ("label", label_column)):
            if column is not None and column not in columns:
                raise ValueError(f"the dataset has no {role} column {column!r}; its columns are {columns}")
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.classes: list[str] = []
        if label_column is not None:
            names = getattr(dataset.features[label_column], "names", None)
            if names is not None:
                self.classes = [str(n) for n in names]
            else:
                labels = dataset[label_column]
                self.classes = [str(c) for c in range(int(max(labels, default=-1)) + 1)]

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, i: int) -> str:
        """How an error names sample ``i`` (its file, row or shard and key)."""
        return f"row {i}"

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        from .writer import to_hwc_uint8

        row = self.dataset[i]
        image = row[self.image_column]
        if isinstance(image, dict):
            image = _decode(image["bytes"]) if image.get("bytes") else _decode(image["path"])
        label = UNLABELLED if self.label_column is None else int(row[self.label_column])
        return to_hwc_uint8(image), label


def expand_shards(spec: str | os.PathLike | list) -> list[Path]:
    """Shard paths from a list, a glob (``data/*.tar``) or a brace range (``shard-{000..009}.tar``)."""
    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for p in spec]
    else:
        text = str(spec)
        start = text.find("{")
        if start >= 0 and ".." in text[start:]:
            end = text.index("}", start)
            low, high = text[start + 1 : end].split("..")
            width = len(low)
            paths = [Path(f"{text[:start]}{n:0{width}d}{text[end + 1 :]}") for n in range(int(low), int(high) + 1)]
        elif any(ch in text for ch in "*?["):
            paths = [Path(p) for p in sorted(glob.glob(text))]
        else:
            paths = [Path(text)]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"no WebDataset shard at {missing or spec}")
    return paths


class TarShards:
    """WebDataset tar shards: each sample is the files sharing a key (``key.jpg``, ``key.cls``).

    The image is the first member with an image extension; the label is an integer in ``.cls``
    (or ``.label``, ``.class``), else the sample is unlabelled. Shards are indexed once (member
    offsets), then read by seeking, so writer processes can read any sample. Read with the
    standard library's ``tarfile``: the ``webdataset`` package is not needed to convert shards.
    """

    LABEL_EXTENSIONS = (".cls", ".label", ".class")

    def __init__(self, shards: str | os.PathLike | list) -> None:
        self.shards = expand_shards(shards)
        self.samples: list[tuple[int, str, int, int, int]] = []  # shard, key, offset, size, label
        for number, shard in enumerate(self.shards):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard) as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    key, dot, ext = base.partition(".")
                    groups.setdefault(f"{folder}/{key}" if folder else key, {})["." + ext.lower()] = member
                for key, files in groups.items():
                    image = next((files[e] for e in files if e in IMAGE_EXTENSIONS), None)
                    if image is None:
                        continue
                    label = UNLABELLED
                    label_member = next((files[e] for e in self.LABEL_EXTENSIONS if e in files), None)
                    if label_member is not None:
                        label = int(archive.extractfile(label_member).read().decode().strip())
                    self.samples.append((number, key, image.offset_data, image.size, label))
        labels = [s[4] for s in self.samples]
        top = max(labels, default=UNLABELLED)
        if top >= 0 and min(labels) < 0:
            raise ValueError(f"shards {self.shards[0]}...: some samples have a .cls label and some do not")
        self.classes = [str(c) for c in range(top + 1)]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, i: int) -> str:
        """How an error names sample ``i`` (its file, row or shard and key)."""
        shard, key = self.samples[i][:2]
        return f"{self.shards[shard]}:{key}"

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        shard, _, offset, size, label = self.samples[i]
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return _decode(data), label
