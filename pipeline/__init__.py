"""masklab.pipeline: datasets to ``.beton``, loaders, the Batch and the stage chain.

Imports nothing from the rest of masklab; ffcv is imported only by the
functions that need it.
"""

from ._ffcv import ffcv_available, require_ffcv
from .batch import Batch
from .builtin import BUILTIN, SHAPE_CLASSES, Digits, Shapes, builtin_dataset
from .crop import (
    CropParams,
    RandomResizedCrop,
    apply_crop,
    centre_crop_params,
    check_crop_args,
    compose_crops,
    draw_crop_params,
    random_resized_crop_params,
)
from .loader import DatasetLoader, InMemoryImages, Loader
from .order import epoch_order
from .sources import UNLABELLED, HFDataset, ImageFolder, PathList, TarShards
from .stage import Chain, Lambda, Stage, batch_generator, clamp_progress, derive_seed, stage_node
from .writer import (
    DatasetInfo,
    WriteReport,
    read_info,
    replace_atomically,
    to_hwc_uint8,
    write_dataset,
    write_text_atomically,
)

__all__ = [
    "BUILTIN",
    "SHAPE_CLASSES",
    "UNLABELLED",
    "HFDataset",
    "ImageFolder",
    "PathList",
    "TarShards",
    "Batch",
    "Chain",
    "CropParams",
    "DatasetInfo",
    "DatasetLoader",
    "InMemoryImages",
    "Digits",
    "Lambda",
    "Loader",
    "RandomResizedCrop",
    "Shapes",
    "Stage",
    "WriteReport",
    "apply_crop",
    "batch_generator",
    "builtin_dataset",
    "clamp_progress",
    "derive_seed",
    "epoch_order",
    "ffcv_available",
    "centre_crop_params",
    "check_crop_args",
    "compose_crops",
    "draw_crop_params",
    "random_resized_crop_params",
    "read_info",
    "replace_atomically",
    "require_ffcv",
    "stage_node",
    "to_hwc_uint8",
    "write_dataset",
    "write_text_atomically",
]
