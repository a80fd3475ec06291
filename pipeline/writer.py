"""Write image datasets to FFCV's ``.beton`` format, and read back what is in one."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._ffcv import require_ffcv
from .sources import IMAGE_EXTENSIONS, HFDataset, ImageFolder, PathList, TarShards, is_hf_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "WriteReport",
    "DatasetInfo",
    "write_dataset",
    "read_info",
    "replace_atomically",
    "to_hwc_uint8",
    "write_text_atomically",
]

logger = logging.getLogger(__name__)


@dataclass
class WriteReport:
    """What :func:`write_dataset` wrote.

    Attributes:
        path: the ``.beton`` file.
        count: number of images written.
        classes: class names, position = label.
        skipped: ``(path, reason)`` of each unreadable image left out.
    """

    path: Path
    count: int
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


# Pillow's modes for 16-bit greyscale PNG and TIFF files ("I" is 32-bit, but so Pillow opens them too).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_hwc_uint8(image: Any) -> np.ndarray:
    """Convert a PIL image, array or tensor to an ``(H, W, 3)`` uint8 array.

    Accepts HW (grey), HWC or CHW layouts. Floats (and PIL mode ``F``) are
    read as ``[0, 1]``; uint16 values and Pillow's 16-bit greyscale modes
    (``I;16``, and ``I`` with values in ``0..65535``) as 16-bit, scaled by
    255/65535; any other integers must already lie in ``0..255``.

    Raises:
        ValueError: an unsupported shape, or integer values that fit none of those ranges.
    """
    if isinstance(image, Image.Image):
        if image.mode not in (*_SIXTEEN_BIT_MODES, "F"):
            return np.asarray(image.convert("RGB"))
        array = np.asarray(image)
        if image.mode in _SIXTEEN_BIT_MODES:
            low, high = int(array.min()), int(array.max())
            if low < 0 or high > 65535:
                raise ValueError(
                    f"a PIL image of mode {image.mode} with values in [{low}, {high}] has no 8-bit scaling: "
                    "convert it to 16 bits (0..65535) or 8 bits first"
                )
            array = array.astype(np.uint16)
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.permute(1, 2, 0)
        array = array.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.transpose(array, (1, 2, 0))
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be HW, HWC or CHW with 1, 3 or 4 channels, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.rint(array * 255.0), 0, 255)
    elif array.dtype == np.uint16:
        array = (array.astype(np.uint32) + 128) // 257  # 65535 = 255 * 257: rounds to the nearest 8-bit value
    elif array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(
            f"{array.dtype} pixel values span [{array.min()}, {array.max()}], outside 0..255: "
            "pass uint8 values, uint16 ones (0..65535) or floats in [0, 1]"
        )
    return np.ascontiguousarray(array.astype(np.uint8))


class _Arrays:
    def __init__(self, images: Any, labels: Any) -> None:
        self.images = images
        self.labels = np.zeros(len(images), dtype=np.int64) if labels is None else np.asarray(labels).astype(np.int64)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
        self.classes = [str(c) for c in range(int(self.labels.max()) + 1)] if len(self.labels) else []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return to_hwc_uint8(self.images[i]), int(self.labels[i])


class _Mapped:
    """Any map-style dataset returning ``(image, label)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        names = getattr(dataset, "classes", None)
        self.classes = [str(c) for c in names] if names is not None else []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"dataset item {i} must be (image, label), got {type(item).__name__}")
        return to_hwc_uint8(item[0]), int(item[1])


_PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere nothing).

    FFCV's writer workers otherwise outlive a killed ``write-dataset``:
    re-parented to init, blocked on a pipe nobody reads, keeping the shared
    metadata segment in ``/dev/shm`` alive.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("cannot tie writer process %d to its parent: %s", os.getpid(), os.strerror(ctypes.get_errno()))
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


class _Indexed:
    """What FFCV's writer reads: ``(image, label, index)`` for ``positions`` of ``source``.

    FFCV's writer waits forever when a worker process dies, so a sample that
    fails to load is never allowed to raise there: it is written as a 1-pixel
    placeholder and its position reported on ``failures``; the caller then
    rewrites without it (or raises, with ``strict``).

    It runs in FFCV's worker processes, which it ties to the writing process
    on its first call there (FFCV's writer has no worker initialiser).
    """

    def __init__(self, source: Any, positions: Sequence[int], failures: Any) -> None:
        self.source, self.positions, self.failures = source, positions, failures
        self.parent_pid = os.getpid()
        self.tied_pid = self.parent_pid

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        if self.tied_pid != os.getpid():
            _die_with_parent(self.parent_pid)
            self.tied_pid = os.getpid()
        try:
            image, label = self.source[self.positions[i]]
        except Exception as error:  # noqa: BLE001 - any loader error means "skip this sample"
            self.failures.put((self.positions[i], f"{type(error).__name__}: {error}"))
            return _PLACEHOLDER, 0, i
        return image, label, i


def _source(source: Any, labels: str = "auto", image_column: str = "image", label_column: str | None = "label"):
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if any(ch in text for ch in "*?[") or ("{" in text and ".." in text):
            return TarShards(text)
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"source path {root} does not exist")
        if root.is_dir():
            if (root / "dataset_info.json").is_file() or (root / "state.json").is_file():
                return HFDataset(_load_from_disk(root), image_column, label_column)
            return ImageFolder(root, labels)
        if root.suffix.lower() == ".tar":
            return TarShards(root)
        if root.suffix.lower() in (".txt", ".lst", ".list"):
            return PathList(root)
        raise ValueError(
            f"source path {root} is not an image folder, a path list (.txt), WebDataset shards (.tar) "
            "or a saved Hugging Face dataset (a folder from Dataset.save_to_disk)"
        )
    if is_hf_dataset(source):
        return HFDataset(source, image_column, label_column)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _Arrays(source, None)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], (np.ndarray, torch.Tensor)):
        return _Arrays(*source)
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return _Mapped(source)
    raise TypeError(
        "source must be an image folder, a path list, WebDataset shards, a Hugging Face dataset, an "
        "array/tensor of images, an (images, labels) tuple, or a map-style dataset returning (image, label); "
        f"got {type(source).__name__}"
    )


def _load_from_disk(root: Path):
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{root} is a saved Hugging Face dataset; reading it needs the datasets package: pip install 'masklab[hf]'"
        ) from None
    return datasets.load_from_disk(str(root))


def replace_atomically(
    write: Callable[[Path], object], path: str | os.PathLike, sidecar: Callable[[], Any] | None = None
) -> None:
    """``write(tmp)`` a temporary file or folder beside ``path`` (and ``sidecar()``'s JSON beside it), then rename.

    The data file is renamed last, so its presence means the write finished;
    a failed write leaves ``path`` as it was and no temporary file or folder
    behind. ``write`` may make ``tmp`` a folder (a checkpoint of several
    files): a folder already at ``path`` is moved aside, replaced, then
    removed, and put back if the replacement fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    side_tmp = _sidecar(tmp)
    aside = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        write(tmp)
        if sidecar is not None:
            side_tmp.write_text(json.dumps(sidecar(), indent=1))
            os.replace(side_tmp, _sidecar(path))
        if tmp.is_dir() and path.is_dir():
            # os.replace cannot rename a folder over a non-empty one.
            os.replace(path, aside)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside, path)
                raise
        else:
            os.replace(tmp, path)
    finally:
        for leftover in (tmp, side_tmp, aside):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            elif leftover.exists() or leftover.is_symlink():
                leftover.unlink()


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`replace_atomically`."""
    replace_atomically(lambda tmp: tmp.write_text(text), path)


def write_dataset(
    source: Any,
    path: str | os.PathLike,
    *,
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    overwrite: bool = False,
    strict: bool = False,
    num_workers: int = -1,
    progress: bool = True,
    classes: Sequence[str] | None = None,
    labels: str = "auto",
    image_column: str = "image",
    label_column: str | None = "label",
) -> WriteReport:
    """Write images and labels to one ``.beton`` file (FFCV).

    Fields: ``image`` (JPEG), ``label`` (int) and ``index`` (the sample's
    position in the file, which keys per-sample caches). The file is written
    under a temporary name and renamed, so an interrupted write never leaves
    a file that looks complete. A JSON sidecar ``PATH.json`` keeps the class
    names and the skipped files.

    Args:
        source: an image folder (with one subfolder per class, or without: see ``labels``); a
            text file listing image paths, optionally each with a label
            (:class:`~masklab.pipeline.sources.PathList`); WebDataset tar shards (a ``.tar``, a
            glob or a brace range such as ``shard-{000..009}.tar``); a Hugging Face
            ``datasets.Dataset``, or a folder written by its ``save_to_disk``; an array or tensor
            of images (labels 0); an ``(images, labels)`` tuple; or any map-style dataset
            returning ``(image, label)`` with PIL, array or tensor images. Sources without labels
            write label -1 (:data:`~masklab.pipeline.sources.UNLABELLED`) and no class names.
        path: the output file.
        max_resolution: longest side kept; larger images are downscaled.
        jpeg_quality: JPEG quality, 1 to 100.
        overwrite: replace an existing file.
        strict: raise on an unreadable image instead of skipping it.
        num_workers: writer processes (-1: all cores).
        progress: show progress bars.
        classes: class names (position = label), overriding what the source says.
        labels: a folder's labels: ``folders``, ``none`` or ``auto`` (:data:`~masklab.pipeline.sources.LABEL_MODES`).
        image_column: a Hugging Face dataset's image column.
        label_column: its label column (``None``: unlabelled).

    Returns:
        A :class:`WriteReport` (count, classes, skipped files).

    Raises:
        FileNotFoundError: the source path does not exist.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ValueError: an empty source, bad arguments, or a bad image with ``strict``.
        ImportError: ffcv is not installed (the message says how to install it).
    """
    path = Path(path)
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 1:
        raise ValueError(f"max_resolution must be positive, got {max_resolution}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite on the command line) to replace it")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    require_ffcv("write_dataset")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    data = _source(source, labels, image_column, label_column)
    if len(data) == 0:
        where = f"source {source}" if isinstance(source, (str, os.PathLike)) else "source"
        raise ValueError(f"{where} holds no images")
    names = [str(c) for c in classes] if classes is not None else list(data.classes)
    describe = getattr(data, "describe", lambda i: f"sample {i}")
    positions = list(range(len(data)))
    skipped: list[tuple[str, str]] = []

    def write(tmp: Path) -> None:
        fields = {
            "image": RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality),
            "label": IntField(),
            "index": IntField(),
        }
        failures = multiprocessing.SimpleQueue()
        with _quiet_progress(progress):
            writer = DatasetWriter(str(tmp), fields, num_workers=num_workers)
            writer.from_indexed_dataset(_Indexed(data, positions, failures), chunksize=64)
        failed = []
        while not failures.empty():
            failed.append(failures.get())
        if not failed:
            return
        failed.sort()
        if strict:
            position, reason = failed[0]
            raise ValueError(f"cannot read image {describe(position)}: {reason}")
        skipped.extend((describe(p), reason) for p, reason in failed)
        bad = {p for p, _ in failed}
        positions[:] = [p for p in positions if p not in bad]
        if not positions:
            raise ValueError("no image of the source could be read")
        # Rare path: write again without the unreadable samples, so indices stay dense.
        write(tmp)

    def sidecar() -> dict[str, Any]:
        return {"count": len(positions), "classes": names, "skipped": [list(x) for x in skipped]}

    replace_atomically(write, path, sidecar)
    if skipped:
        logger.warning("skipped %d unreadable image(s): %s", len(skipped), ", ".join(p for p, _ in skipped))
    return WriteReport(path=path, count=len(positions), classes=names, skipped=skipped)


@contextlib.contextmanager
def _quiet_progress(progress: bool):
    """FFCV's writer always draws a tqdm bar; swap in a disabled one when asked."""
    if progress:
        yield
        return
    import functools

    import ffcv.writer
    from tqdm import tqdm

    original = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


@dataclass
class DatasetInfo:
    """What :func:`read_info` finds in a ``.beton`` file."""

    path: Path
    count: int
    fields: dict[str, str]
    min_size: tuple[int, int]
    max_size: tuple[int, int]
    num_classes: int
    classes: list[str]
    unlabelled: int = 0  # images with label -1 (a source without labels)

    @property
    def labelled(self) -> bool:
        """Whether every image has a label (kNN and linear evaluation need that)."""
        return self.unlabelled == 0

    def __str__(self) -> str:
        lines = [
            f"file:       {self.path}",
            f"images:     {self.count}",
            "fields:     " + ", ".join(f"{k} ({v})" for k, v in self.fields.items()),
            f"resolution: {self.min_size[0]}x{self.min_size[1]}"
            + ("" if self.min_size == self.max_size else f" to {self.max_size[0]}x{self.max_size[1]}")
            + " (HxW)",
            f"classes:    {self.num_classes}" + (f" ({', '.join(self.classes)})" if self.classes else ""),
        ]
        if self.unlabelled:
            lines.append(f"unlabelled: {self.unlabelled} images (label -1)")
        return "\n".join(lines)


def _open_beton(path: str | os.PathLike, what: str) -> Any:
    """FFCV's ``Reader`` of ``path``, once the file is known to be a whole ``.beton``.

    FFCV's reader checks little: a truncated file fails with "negative
    dimensions are not allowed", or opens and later reads past its end; other
    bytes fail with "file format mismatch". Reading uses numpy structured
    dtypes and JSON only (no pickle), whatever the file holds.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a ``.beton`` file, or one cut short; the
            message names it and says how to write it again.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist; write one with `masklab write-dataset`")
    require_ffcv(what)
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    def incomplete(reason: str) -> ValueError:
        return ValueError(
            f"{path} is not a complete .beton file: {reason}. "
            f"Write it again from its source: `masklab write-dataset SRC {path} --overwrite`"
        )

    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise incomplete(f"it holds {size} bytes, fewer than FFCV's {HeaderType.itemsize}-byte header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise incomplete(f"its header is not FFCV's (format version {header['version']}, expected {CURRENT_VERSION})")
    table_start = int(header["alloc_table_ptr"])
    if table_start > size:
        raise incomplete(f"it stops at byte {size}, before its allocation table at byte {table_start} (truncated)")
    if (size - table_start) % ALLOC_TABLE_TYPE.itemsize:
        raise incomplete(f"its allocation table, from byte {table_start} to the end at {size}, is cut short")
    try:
        reader = Reader(str(path))
    except Exception as error:  # noqa: BLE001 - a damaged file fails in FFCV's reader in many ways
        raise incomplete(f"FFCV cannot read it ({type(error).__name__}: {error})") from error
    count = int(reader.num_samples)
    if len(reader.metadata) != count:
        raise incomplete(f"its sample table holds {len(reader.metadata)} of its {count} samples (truncated)")
    table = reader.alloc_table
    data_start = HeaderType.itemsize + reader.field_descriptors.nbytes + reader.metadata.nbytes
    if len(table) and (
        int(table["ptr"].min()) < data_start
        or int((table["ptr"] + table["size"]).max()) > table_start
        or int(table["sample_id"].max()) >= count
    ):
        raise incomplete("its allocation table points outside its data")
    for i, (name, handler) in enumerate(reader.handlers.items()):
        if "data_ptr" in (handler.metadata_type.names or ()):
            missing = int((~np.isin(reader.metadata[f"f{i}"]["data_ptr"], table["ptr"])).sum())
            if missing:
                raise incomplete(f"the {name} data of {missing} of its {count} samples are not in its allocation table")
    return reader


def _read_classes(path: Path) -> list[str]:
    """Class names from the JSON sidecar of ``path`` (parsed as JSON only), or ``[]`` without one."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return []
    try:
        content = json.loads(sidecar.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{sidecar} is not JSON ({error}); delete it, or write {path} again with --overwrite"
        ) from error
    classes = content.get("classes", []) if isinstance(content, dict) else None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(
            f"{sidecar} does not hold a list of class names under 'classes'; delete it, "
            f"or write {path} again with --overwrite"
        )
    return classes


def read_info(path: str | os.PathLike) -> DatasetInfo:
    """Count, fields, image sizes and classes of a ``.beton`` file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a complete ``.beton`` file, has no image
            field, or its ``PATH.json`` sidecar is not what :func:`write_dataset` writes.
    """
    path = Path(path)
    reader = _open_beton(path, "read_info")
    meta = reader.metadata
    fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
    # FFCV names the metadata columns f0, f1, ... in field order.
    column = {name: f"f{i}" for i, name in enumerate(reader.handlers)}
    if "image" not in column:
        raise ValueError(f"{path} has no image field (fields: {', '.join(fields)})")
    image_meta = meta[column["image"]]
    heights, widths = image_meta["height"], image_meta["width"]
    labels = np.asarray(meta[column["label"]]) if "label" in column else np.zeros(0)
    classes = _read_classes(path)
    return DatasetInfo(
        path=path,
        count=int(reader.num_samples),
        fields=fields,
        min_size=(int(heights.min()), int(widths.min())),
        max_size=(int(heights.max()), int(widths.max())),
        num_classes=int(np.unique(labels[labels >= 0]).size),
        classes=list(classes),
        unlabelled=int((labels < 0).sum()),
    )
