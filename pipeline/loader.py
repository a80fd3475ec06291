"""Loaders that yield :class:`Batch` objects through a stage chain.

:class:`Loader` reads a ``.beton`` file with FFCV; :class:`DatasetLoader`
reads any map-style dataset (in-memory tensors, a torch ``Dataset``) with a
torch ``DataLoader``. Both draw every crop box and flip of an epoch up front
from ``(seed, epoch, rank)``, record them in each :class:`Batch`
(``crops``, ``flips``, ``source_sizes``), then run the user's stages on
``device``.

Where the crop runs: in :class:`Loader`, inside FFCV's decoder threads on
uint8 pixels (OpenCV's area resize), from the drawn boxes; FFCV's own
``RandomResizedCropRGBImageDecoder`` cannot report its boxes, and cropping on
the device instead costs more than the decode on a CPU (``benchmarks/loader.py``
measures all three). In :class:`DatasetLoader`, on the device with kornia.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._ffcv import require_ffcv
from .batch import Batch
from .crop import CropParams, apply_crop, check_crop_args, draw_crop_params
from .order import epoch_order
from .stage import Chain, derive_seed
from .writer import _open_beton, to_hwc_uint8

__all__ = ["Loader", "DatasetLoader"]

logger = logging.getLogger(__name__)

StageLike = nn.Module | Callable[[Batch], Batch]
_ORDERS = ("random", "sequential")
_CROP_SALT = 0xC409
# What write_dataset writes, and all the loader decodes.
_BETON_FIELDS = {"image": "RGBImageField", "label": "IntField", "index": "IntField"}


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised process group: build the loader after "
            "accelerate.Accelerator() or torch.distributed.init_process_group()"
        )
    return dist.get_rank(), dist.get_world_size()


_SHARED_ARGS = (
    "stages",
    "batch_size",
    "resolution",
    "device",
    "seed",
    "order",
    "drop_last",
    "distributed",
    "scale",
    "ratio",
    "flip_p",
)
"""The constructor arguments every loader hands to :class:`_BatchLoader`, by name."""


def _shared_args(scope: dict[str, Any]) -> dict[str, Any]:
    """:data:`_SHARED_ARGS` taken from a loader constructor's ``locals()``."""
    return {name: scope[name] for name in _SHARED_ARGS}


class _BatchLoader:
    """Epochs, ordering, crop draws, seeding, resume and the stage chain; subclasses read."""

    def __init__(
        self,
        num_samples: int,
        *,
        stages: Sequence[StageLike],
        batch_size: int,
        resolution: int,
        device: torch.device | str,
        seed: int,
        order: str,
        drop_last: bool,
        distributed: bool,
        scale: tuple[float, float] | None,
        ratio: tuple[float, float],
        flip_p: float,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        if num_samples < 1:
            raise ValueError("the dataset holds no samples")
        check_crop_args(scale, ratio, flip_p)
        self.num_samples = int(num_samples)
        self.batch_size = batch_size
        self.resolution = resolution
        self.device = torch.device(device)
        self.seed = int(seed)
        self.order = order
        self.drop_last = drop_last
        self.distributed = distributed
        self.rank, self.world_size = _rank_and_world(distributed)
        self.scale = None if scale is None else tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p
        self.chain = Chain(stages)
        self.epoch = 0
        self.step = 0
        if len(self) == 0:
            raise ValueError(
                f"{num_samples} samples on {self.world_size} rank(s) make no full batch of {batch_size}; "
                "lower batch_size or set drop_last=False"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = -(-self.num_samples // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The dataset indices this rank reads in ``epoch`` (default: the current one), in order."""
        indices = epoch_order(
            self.num_samples,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            shuffle=self.order == "random",
            rank=self.rank,
            world_size=self.world_size,
        )
        return indices[: len(self) * self.batch_size]

    def source_sizes(self, indices: np.ndarray) -> torch.Tensor:
        """``(len(indices), 2)`` int64 ``(H, W)`` of the source images the boxes refer to."""
        raise NotImplementedError

    def epoch_crops(self, indices: np.ndarray, epoch: int | None = None) -> CropParams:
        """Crop boxes and flips of every position of ``indices`` in ``epoch``, drawn on the CPU.

        One draw per epoch, seeded from ``(seed, epoch, rank)``, so a resumed
        epoch gets the same boxes, and FFCV can crop batches it reads ahead.
        """
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, _CROP_SALT))
        return draw_crop_params(
            len(indices), self.source_sizes(indices), self.scale, self.ratio, self.flip_p, generator
        )

    def _read(
        self, indices: np.ndarray, crops: CropParams
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(float images (B, 3, r, r) cropped as ``crops`` says, labels, index)`` on ``self.device``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        start = self.step
        indices = self.epoch_indices()
        crops = self.epoch_crops(indices)
        sizes = self.source_sizes(indices)
        first = start * self.batch_size
        non_blocking = self.device.type == "cuda"
        reader = self._read(indices[first:], crops[first:])
        for offset, (images, labels, index) in enumerate(reader):
            step = start + offset
            rows = slice(step * self.batch_size, step * self.batch_size + len(index))
            batch = Batch(
                images=images,
                labels=labels,
                index=index,
                crops=crops.boxes[rows].to(self.device, non_blocking=non_blocking),
                flips=crops.flips[rows].to(self.device, non_blocking=non_blocking),
                source_sizes=sizes[rows].to(self.device, non_blocking=non_blocking),
                seed=derive_seed(self.seed, self.epoch, step, self.rank),
            )
            out = self.chain(batch)
            self.step = step + 1
            yield out
        self.epoch += 1
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        """``(seed, epoch, step)``: where the next batch comes from."""
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``: the same order, crops and stage randomness as the saved run."""
        missing = {"seed", "epoch", "step"} - set(state)
        if missing:
            raise KeyError(f"loader state lacks {sorted(missing)}")
        if not 0 <= int(state["step"]) <= len(self):
            raise ValueError(f"loader state step {state['step']} is outside [0, {len(self)}]")
        self.seed, self.epoch, self.step = int(state["seed"]), int(state["epoch"]), int(state["step"])

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self.epoch, self.step = int(epoch), 0

    def close(self) -> None:
        """Stop reading ahead for any epoch in flight; the loader can iterate again afterwards.

        :class:`Loader` stops FFCV's thread here; a torch ``DataLoader``'s
        workers end with its iterator, so :class:`DatasetLoader` has nothing to stop.
        """

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ffcv_loader_class():
    require_ffcv("masklab.pipeline.Loader")
    from ffcv.loader import Loader as FFCVLoader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class ReportingEpochIterator(EpochIterator):
        """FFCV's epoch thread, which on an error ends the epoch and keeps the error for the reader.

        FFCV's own thread dies on an error and leaves its reader waiting forever.
        """

        error: BaseException | None = None

        def run(self) -> None:
            try:
                super().run()
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread, which raises it
                self.error = error
                self.output_queue.put(None)

    class OrderedFFCVLoader(FFCVLoader):
        """FFCV's loader, reading exactly the order masklab hands it."""

        def __init__(self, *args: Any, first_order: np.ndarray, **kwargs: Any) -> None:
            self.masklab_order = first_order
            super().__init__(*args, **kwargs)

        def next_traversal_order(self) -> np.ndarray:
            return self.masklab_order

        def __len__(self) -> int:
            n = len(self.masklab_order)
            return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

        def __iter__(self) -> ReportingEpochIterator:
            # FFCV's own __iter__, with the thread above.
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()[: len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return ReportingEpochIterator(self, order)

    return OrderedFFCVLoader


_STOP_TIMEOUT_S = 60.0


def _stop_epoch_thread(epoch: Any) -> None:
    """Stop and join the thread of an FFCV ``EpochIterator``, then release its memory context.

    A thread left running when the interpreter exits aborts the process
    (``terminate called without an active exception``, exit code 134). FFCV's
    thread looks at its terminate event only while its output queue is full,
    and puts its end-of-epoch marker with a blocking ``put``: so it is handed
    no further batch, and its queue is emptied until it returns, which costs
    at most the batch it is decoding (or, on the first epoch, numba's compile).
    """
    epoch.iter_ixes = iter(())
    epoch.terminate_event.set()
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while epoch.is_alive():
        with contextlib.suppress(queue.Empty):
            while True:
                epoch.output_queue.get_nowait()
        epoch.join(timeout=0.05)
        if time.monotonic() > deadline:
            logger.warning("FFCV's reading thread did not stop within %.0f s; leaving it running", _STOP_TIMEOUT_S)
            return
    epoch.close()


class _Epoch:
    """One FFCV epoch in flight; its reading thread stops when this is closed or collected, or at exit.

    Args:
        ffcv_loader: the FFCV loader to start the epoch of.
        indices: the dataset indices it reads.
        number: the epoch's number.
    """

    def __init__(self, ffcv_loader: Any, indices: np.ndarray, number: int) -> None:
        self.indices, self.number = indices, number
        self._thread = iter(ffcv_loader)
        # Holds the thread, not this object, and runs at interpreter exit if still pending.
        self._stop = weakref.finalize(self, _stop_epoch_thread, self._thread)

    def __iter__(self) -> _Epoch:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if not self._stop.alive:
            raise RuntimeError(
                "this epoch's reading was stopped (the loader was closed, or a new iteration over it began); "
                "iterate the loader again to read on"
            )
        try:
            return next(self._thread)
        except StopIteration:
            error = self._thread.error
            if error is None:
                raise
            raise RuntimeError(f"FFCV's reading thread failed: {type(error).__name__}: {error}") from error

    def close(self) -> bool:
        """Stop the thread; ``True`` if this call stopped it, ``False`` if it was stopped before."""
        running = self._stop.alive
        self._stop()
        return running


class Loader(_BatchLoader):
    """Read a ``.beton`` file with FFCV and yield :class:`Batch` objects.

    FFCV reads each image and, in its numba worker threads, decodes the JPEG,
    crops the box masklab drew for it, resizes to ``resolution`` (uint8,
    OpenCV area resize) and flips it; the batch moves to ``device``, becomes
    float in ``[0, 1]``, and ``stages`` run there. Boxes are in pixels of the
    stored image (``batch.crops``, with ``batch.source_sizes``).

    The epoch order comes from ``(seed, epoch)`` and is sharded across ranks
    by masklab (the rule of PyTorch's ``DistributedSampler``), not by FFCV's
    ``distributed=True``: owning the order is what lets a run resume
    mid-epoch. Build a distributed loader after the process group exists.

    Args:
        path: a ``.beton`` file from :func:`~masklab.pipeline.write_dataset`.
        stages: batch stages run on the device after the crop.
        batch_size: images per batch (per rank).
        resolution: side of the output crops.
        device: where batches and stages live (``"cpu"``, ``"cuda"``, ...).
        seed: seeds the order, the crops and every stage's randomness.
        num_workers: FFCV decoding threads (default: the cores available).
        order: ``"random"`` or ``"sequential"``.
        drop_last: drop the last partial batch (so every batch has the same size).
        distributed: shard across the ranks of the initialised process group.
        scale: crop area range; ``None`` takes the centred square (evaluation).
        ratio: crop aspect range.
        flip_p: probability of a left-right flip.
        batches_ahead: batches FFCV prepares in advance.

    FFCV decodes ahead in a thread of its own. It stops when the iterator is
    exhausted, closed or garbage-collected, when a new iteration starts, when
    :meth:`close` is called (``with Loader(...) as loader:`` calls it on
    leaving), and at the latest at interpreter exit; so a script may take one
    batch and end.

    Examples:
        >>> loader = Loader("shapes.beton", batch_size=64, resolution=32)  # doctest: +SKIP
        >>> batch = next(iter(loader))  # doctest: +SKIP
        >>> with Loader("shapes.beton", batch_size=64) as loader:  # doctest: +SKIP
        ...     first = next(iter(loader))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        stages: Sequence[StageLike] = (),
        batch_size: int = 64,
        resolution: int = 32,
        device: torch.device | str = "cpu",
        seed: int = 0,
        num_workers: int | None = None,
        order: str = "random",
        drop_last: bool = True,
        distributed: bool = False,
        scale: tuple[float, float] | None = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        batches_ahead: int = 2,
    ) -> None:
        ffcv_cls = _ffcv_loader_class()
        from ffcv.fields.basics import IntDecoder
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        from ._ffcv_decode import TABLE_COLUMNS, TableCropDecoder

        self.path = str(path)
        reader = _open_beton(self.path, "masklab.pipeline.Loader")
        kinds = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
        if any(kinds.get(name) != kind for name, kind in _BETON_FIELDS.items()):
            raise ValueError(
                f"{self.path} is not a masklab dataset: it needs the fields "
                + ", ".join(f"{name} ({kind})" for name, kind in _BETON_FIELDS.items())
                + ", and has "
                + (", ".join(f"{name} ({kind})" for name, kind in kinds.items()) or "none")
                + "; write it with `masklab write-dataset`"
            )
        image = reader.metadata[f"f{list(reader.handlers).index('image')}"]
        self._sizes = torch.from_numpy(np.stack([image["height"], image["width"]], axis=1).astype(np.int64))
        super().__init__(reader.num_samples, **_shared_args(locals()))
        self._epochs: weakref.WeakSet[_Epoch] = weakref.WeakSet()
        # Read by the compiled decoder through its address: fill in place, never reassign.
        self._crop_table = np.zeros((self.num_samples, TABLE_COLUMNS), dtype=np.int64)
        self._decode_failed = np.zeros(self.num_samples, dtype=np.int32)
        # Squeeze(1), not Squeeze(): a batch of one keeps its batch dimension.
        ints = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(self.device, non_blocking=True)]
        self._ffcv = ffcv_cls(
            self.path,
            batch_size=batch_size,
            num_workers=num_workers or len(os.sched_getaffinity(0)),
            drop_last=drop_last,
            batches_ahead=batches_ahead,
            pipelines={
                "image": [
                    TableCropDecoder((resolution, resolution), self._crop_table, self._decode_failed),
                    ToTensor(),
                    ToDevice(self.device, non_blocking=True),
                    ToTorchImage(),
                ],
                "label": ints,
                "index": list(ints),
                # Other fields are never decoded.
                **{name: None for name in kinds if name not in _BETON_FIELDS},
            },
            first_order=self.epoch_indices(),
        )

    def source_sizes(self, indices: np.ndarray) -> torch.Tensor:
        return self._sizes[torch.from_numpy(indices)]

    def _read(
        self, indices: np.ndarray, crops: CropParams
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # The crop table is shared: an earlier epoch still reading would crop with this one's boxes.
        self.close()
        x0, y0, x1, y1 = crops.boxes.long().unbind(1)
        self._crop_table[indices] = torch.stack([y0, x0, y1 - y0, x1 - x0, crops.flips.long()], dim=1).numpy()
        self._ffcv.masklab_order = indices
        self._decode_failed[:] = 0
        epoch = _Epoch(self._ffcv, indices, self.epoch)
        self._epochs.add(epoch)
        try:
            # FFCV recycles its output buffers: what outlives the step is copied.
            for images, labels, index in epoch:
                yield images.float().div_(255.0), labels.long().clone(), index.long().clone()
        finally:
            self._end_epoch(epoch)

    def _end_epoch(self, epoch: _Epoch) -> None:
        """Stop ``epoch``'s thread; then, once, warn of the images it could not decode."""
        if not epoch.close():
            return
        failed = np.flatnonzero(self._decode_failed[epoch.indices])
        if len(failed):
            first = ", ".join(str(i) for i in sorted(epoch.indices[failed])[:5])
            warnings.warn(
                f"{len(failed)} of the {len(epoch.indices)} images of epoch {epoch.number} in {self.path} "
                f"failed to decode (corrupt JPEG data, at indices {first}{', ...' if len(failed) > 5 else ''}): "
                "they come out black. Write the file again from its source: "
                f"`masklab write-dataset SRC {self.path} --overwrite`",
                RuntimeWarning,
                stacklevel=2,
            )

    def close(self) -> None:
        """Stop FFCV's reading thread for any epoch in flight; iterating again starts a new one."""
        for epoch in list(self._epochs):
            self._end_epoch(epoch)


def _square_uint8(image: Any, size: int | None) -> torch.Tensor:
    """``(3, S, S)`` uint8: centre square of the image, resized to ``size``.

    Not torchvision's ``center_crop`` + ``resize``: its crop offset rounds half
    to even where ours floors, and its uint8 antialiased resize rounds
    differently, so the pixels (and every figure made from them) would change.
    """
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        tensor = image
    else:
        tensor = torch.from_numpy(to_hwc_uint8(image)).permute(2, 0, 1)
    h, w = tensor.shape[-2:]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        tensor = tensor[:, top : top + side, left : left + side]
    if size is not None and tensor.shape[-1] != size:
        tensor = F.interpolate(
            tensor[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        tensor = tensor[0].round().clamp_(0, 255).to(torch.uint8)
    return tensor.contiguous()


class _Collate:
    def __init__(self, size: int | None) -> None:
        self.size = size

    def __call__(self, items: list[tuple[Any, Any, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        squares = [_square_uint8(image, self.size) for image, _, _ in items]
        sizes = {tuple(s.shape[-2:]) for s in squares}
        if len(sizes) > 1:
            raise ValueError(f"images differ in size {sorted(sizes)}; pass decode_size to decode them all at one size")
        images = torch.stack(squares)
        labels = torch.tensor([int(label) for _, label, _ in items], dtype=torch.long)
        index = torch.tensor([i for _, _, i in items], dtype=torch.long)
        return images, labels, index


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) >= 2


class _WithIndex:
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        item = self.dataset[i]
        if _is_pair(item):
            return item[0], item[1], i
        return item, -1, i


class InMemoryImages:
    """A labelled image set held as one ``(N, 3, S, S)`` uint8 tensor: read once, then gathered per batch.

    A map-style dataset (``dataset[i]`` is ``(image, label)``), so it works wherever one does. Given to
    :class:`DatasetLoader`, it skips the per-sample reading and collation: the tensor moves to the
    loader's device once, and each batch is one index gather there, with no worker processes. For sets that
    fit in (GPU) memory and are slow to read or generate per epoch, such as the built-in shapes
    (50000 32 px images: 154 MB).

    Examples:
        >>> import torch
        >>> data = InMemoryImages(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
        >>> len(data), data[1][0].shape, int(data[1][1])
        (4, torch.Size([3, 8, 8]), 1)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if (
            images.dtype != torch.uint8
            or images.ndim != 4
            or images.shape[1] != 3
            or images.shape[2] != images.shape[3]
        ):
            raise ValueError(
                f"images must be square uint8 (N, 3, S, S), got {images.dtype} of shape {tuple(images.shape)}"
            )
        if labels is None:
            labels = torch.full((len(images),), -1, dtype=torch.long)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be ({len(images)},), one per image, got shape {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def read(cls, dataset: Any, size: int | None = None, num_workers: int = 0, batch_size: int = 256) -> InMemoryImages:
        """Every item of a map-style ``dataset`` read once (by ``num_workers`` processes), as
        :class:`DatasetLoader` reads them: centre squares, resized to ``size`` if given; label -1 if none."""
        from torch.utils.data import DataLoader

        reader = DataLoader(
            _WithIndex(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_Collate(size)
        )
        images, labels = zip(*((images, labels) for images, labels, _ in reader), strict=True)
        return cls(torch.cat(images), torch.cat(labels))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def side(self) -> int:
        return int(self.images.shape[-1])

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` on ``device``, copied there once."""
        if device not in self._on:
            self._on[device] = (self.images.to(device), self.labels.to(device))
        return self._on[device]


class DatasetLoader(_BatchLoader):
    """The same loader contract over any map-style dataset, without ffcv.

    Use it for in-memory tensors (``torch.utils.data.TensorDataset``), the
    built-in datasets, or any dataset returning ``(image, label)`` with PIL,
    array or tensor images. A torch ``DataLoader`` reads and collates on the
    CPU, bringing every image to one square ``decode_size`` (centre square,
    resized; by default the images' own side, which they must then share);
    the crop (kornia) and ``stages`` run on ``device``. An
    :class:`InMemoryImages` (at ``decode_size``, or with it unset) is not read
    per sample: it is copied to ``device`` once and each batch is gathered
    there (``num_workers`` unused); the batches are the same. The order, the crop
    draws, the seeding and resume are those of :class:`Loader`, whose other
    arguments this takes, with ``dataset`` in place of ``path``.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8), torch.arange(8))
        >>> loader = DatasetLoader(data, batch_size=4, resolution=8, order="sequential")
        >>> [b.index.tolist() for b in loader]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """

    def __init__(
        self,
        dataset: Any,
        stages: Sequence[StageLike] = (),
        batch_size: int = 64,
        resolution: int = 32,
        decode_size: int | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        num_workers: int = 0,
        order: str = "random",
        drop_last: bool = True,
        distributed: bool = False,
        scale: tuple[float, float] | None = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
    ) -> None:
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"dataset must be map-style (__getitem__ and __len__), got {type(dataset).__name__}")
        super().__init__(len(dataset), **_shared_args(locals()))
        self.dataset = dataset
        self.decode_size = decode_size
        self.num_workers = num_workers
        self._side: int | None = None

    def source_sizes(self, indices: np.ndarray) -> torch.Tensor:
        side = self.decode_size if self.decode_size is not None else self._native_side()
        return torch.full((len(indices), 2), side, dtype=torch.long)

    def _native_side(self) -> int:
        if self._side is None:
            self._side = int(
                _square_uint8(self.dataset[0][0] if _is_pair(self.dataset[0]) else self.dataset[0], None).shape[-1]
            )
        return self._side

    def _read(
        self, indices: np.ndarray, crops: CropParams
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if isinstance(self.dataset, InMemoryImages) and self.decode_size in (None, self.dataset.side):
            yield from self._gather(indices, crops)
            return
        from torch.utils.data import DataLoader

        reader = DataLoader(
            _WithIndex(self.dataset),
            batch_size=self.batch_size,
            sampler=indices.tolist(),
            num_workers=self.num_workers,
            collate_fn=_Collate(self.decode_size),
            pin_memory=self.device.type == "cuda",
            drop_last=self.drop_last,
            persistent_workers=False,
        )
        non_blocking = self.device.type == "cuda"
        size = (self.resolution, self.resolution)
        start = 0
        for images, labels, index in reader:
            rows = slice(start, start + len(index))
            start += len(index)
            images = images.to(self.device, non_blocking=non_blocking)
            yield (
                apply_crop(images, crops[rows].to(self.device, non_blocking=non_blocking), size),
                labels.to(self.device, non_blocking=non_blocking),
                index.to(self.device, non_blocking=non_blocking),
            )

    def _gather(
        self, indices: np.ndarray, crops: CropParams
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """:meth:`_read` for an :class:`InMemoryImages`: one gather on the device per batch."""
        images, labels = self.dataset.on(self.device)
        order = torch.as_tensor(indices, dtype=torch.long).to(self.device)
        size = (self.resolution, self.resolution)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            rows = slice(start, start + len(index))
            boxes = crops[rows].to(self.device, non_blocking=self.device.type == "cuda")
            yield apply_crop(images[index], boxes, size), labels[index], index
