"""Loaders that yield :class:`Batch` objects through a stage chain.

:class:`Loader` reads a ``.beton`` file with FFCV; :class:`DatasetLoader`
reads any map-style dataset (in-memory tensors, a torch ``Dataset``) with a
torch ``DataLoader``. Both decode each image once at a fixed square size,
move the uint8 batch to ``device``, then run the same chain there: a
:class:`~masklab.pipeline.RandomResizedCrop` that records its boxes and
flips, then the user's stages.

Why crop on the device rather than in FFCV's crop decoder: FFCV's
``RandomResizedCropRGBImageDecoder`` does not expose the boxes it draws, and
model-guided masks (AMT) must resample a per-image map with them; one decode
also serves several views. ``benchmarks/loader.py`` measures both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._ffcv import require_ffcv
from .batch import Batch
from .crop import RandomResizedCrop
from .order import epoch_order
from .stage import Chain, derive_seed
from .writer import to_hwc_uint8

__all__ = ["Loader", "DatasetLoader"]

StageLike = nn.Module | Callable[[Batch], Batch]
_ORDERS = ("random", "sequential")


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


class _BatchLoader:
    """Epochs, ordering, seeding, resume and the stage chain; subclasses read."""

    def __init__(
        self,
        num_samples: int,
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
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        if num_samples < 1:
            raise ValueError("the dataset holds no samples")
        self.num_samples = int(num_samples)
        self.batch_size = batch_size
        self.resolution = resolution
        self.device = torch.device(device)
        self.seed = int(seed)
        self.order = order
        self.drop_last = drop_last
        self.distributed = distributed
        self.rank, self.world_size = _rank_and_world(distributed)
        self.crop = RandomResizedCrop(resolution, scale=scale, ratio=ratio, flip_p=flip_p)
        self.chain = Chain([self.crop, *stages])
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

    def _read(self, indices: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(uint8 images (B, 3, S, S), labels, index)`` on ``self.device``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        start = self.step
        remaining = self.epoch_indices()[start * self.batch_size :]
        for offset, (images, labels, index) in enumerate(self._read(remaining)):
            step = start + offset
            batch = Batch(
                images=images,
                labels=labels,
                index=index,
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
        """Continue from ``state``: the same order and stage randomness as the saved run."""
        missing = {"seed", "epoch", "step"} - set(state)
        if missing:
            raise KeyError(f"loader state lacks {sorted(missing)}")
        if not 0 <= int(state["step"]) <= len(self):
            raise ValueError(f"loader state step {state['step']} is outside [0, {len(self)}]")
        self.seed, self.epoch, self.step = int(state["seed"]), int(state["epoch"]), int(state["step"])

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self.epoch, self.step = int(epoch), 0


def _common_square_size(reader: Any) -> int | None:
    """The side of the images if they are all one square size, else ``None``."""
    image = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    heights, widths = np.unique(image["height"]), np.unique(image["width"])
    if len(heights) == len(widths) == 1 and heights[0] == widths[0]:
        return int(heights[0])
    return None


def _ffcv_loader_class():
    require_ffcv("masklab.pipeline.Loader")
    from ffcv.loader import Loader as FFCVLoader

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

    return OrderedFFCVLoader


class Loader(_BatchLoader):
    """Read a ``.beton`` file with FFCV and yield :class:`Batch` objects.

    FFCV reads and JPEG-decodes each image on the CPU (numba threads) at a
    fixed ``decode_size`` (centre square, resized), batches it, and moves it to
    ``device``. There the chain runs: random resized crop and flip (boxes
    recorded in ``batch.crops`` / ``batch.flips``), then ``stages``.

    The epoch order comes from ``(seed, epoch)`` and is sharded across ranks
    by masklab (the rule of PyTorch's ``DistributedSampler``), not by FFCV's
    ``distributed=True``: owning the order is what lets a run resume
    mid-epoch. Stage randomness is seeded from ``(seed, epoch, step, rank)``.

    Args:
        path: a ``.beton`` file from :func:`~masklab.pipeline.write_dataset`.
        stages: batch stages run on the device after the crop.
        batch_size: images per batch (per rank).
        resolution: side of the output crops.
        decode_size: side images are decoded at (centre square, resized). By
            default the images' own side when they all share one square size
            (the built-in sets), else ``resolution``; for photos of mixed
            sizes set it a little above ``resolution`` (e.g. 256 for 224).
        device: where batches and stages live (``"cpu"``, ``"cuda"``, ...).
        seed: seeds the order and every stage's randomness.
        num_workers: FFCV decoding threads (default: the cores available).
        order: ``"random"`` or ``"sequential"``.
        drop_last: drop the last partial batch (so every batch has the same size).
        distributed: shard across the ranks of the initialised process group.
        scale: crop area range; ``None`` resizes the whole image (evaluation).
        ratio: crop aspect range.
        flip_p: probability of a left-right flip.
        batches_ahead: batches FFCV prepares in advance.

    Examples:
        >>> loader = Loader("shapes.beton", batch_size=64, resolution=32)  # doctest: +SKIP
        >>> batch = next(iter(loader))  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike,
        stages: Sequence[StageLike] = (),
        batch_size: int = 64,
        resolution: int = 32,
        decode_size: int | None = None,
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
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.reader import Reader
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset file {path} does not exist; write one with `masklab write-dataset`")
        self.path = str(path)
        reader = Reader(self.path)
        num_samples = reader.num_samples
        self.decode_size = int(decode_size or _common_square_size(reader) or resolution)
        super().__init__(
            num_samples,
            stages,
            batch_size,
            resolution,
            device,
            seed,
            order,
            drop_last,
            distributed,
            scale,
            ratio,
            flip_p,
        )
        ints = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(self.device, non_blocking=True)]
        self._ffcv = ffcv_cls(
            self.path,
            batch_size=batch_size,
            num_workers=num_workers or len(os.sched_getaffinity(0)),
            drop_last=drop_last,
            batches_ahead=batches_ahead,
            pipelines={
                "image": [
                    CenterCropRGBImageDecoder((self.decode_size, self.decode_size), ratio=1.0),
                    ToTensor(),
                    ToDevice(self.device, non_blocking=True),
                    ToTorchImage(),
                ],
                "label": ints,
                "index": list(ints),
            },
            first_order=self.epoch_indices(),
        )

    def _read(self, indices: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._ffcv.masklab_order = indices
        # FFCV recycles its output buffers: keep copies of what outlives the step.
        for images, labels, index in self._ffcv:
            yield images, labels.long().clone(), index.long().clone()


def _square_uint8(image: Any, size: int | None) -> torch.Tensor:
    """``(3, S, S)`` uint8: centre square of the image, resized to ``size``."""
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


class _WithIndex:
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        item = self.dataset[i]
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            return item[0], item[1], i
        return item, -1, i


class DatasetLoader(_BatchLoader):
    """The same loader contract over any map-style dataset, without ffcv.

    Use it for in-memory tensors (``torch.utils.data.TensorDataset``), the
    built-in datasets, or any dataset returning ``(image, label)`` with PIL,
    array or tensor images. A torch ``DataLoader`` reads and collates on the
    CPU; the crop and ``stages`` then run on ``device`` exactly as in
    :class:`Loader`. Arguments are those of :class:`Loader`, with ``dataset``
    in place of ``path``.

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
        super().__init__(
            len(dataset),
            stages,
            batch_size,
            resolution,
            device,
            seed,
            order,
            drop_last,
            distributed,
            scale,
            ratio,
            flip_p,
        )
        self.dataset = dataset
        self.decode_size = decode_size
        self.num_workers = num_workers

    def _read(self, indices: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
        for images, labels, index in reader:
            yield (
                images.to(self.device, non_blocking=non_blocking),
                labels.to(self.device, non_blocking=non_blocking),
                index.to(self.device, non_blocking=non_blocking),
            )
