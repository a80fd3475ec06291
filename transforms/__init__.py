"""masklab.transforms: mask stages, view and augmentation stages, mixing."""

from .normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize, normalize

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "normalize"]
