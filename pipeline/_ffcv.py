"""The optional ffcv dependency, imported only where it is needed."""

from __future__ import annotations

import importlib
from types import ModuleType

SYSTEM_PACKAGES = "pkg-config libturbojpeg0-dev libopencv-dev g++"
INSTALL_HINT = (
    "install the system packages first (Debian/Ubuntu: "
    f"`apt-get install {SYSTEM_PACKAGES}`), then `pip install 'masklab[ffcv]'`"
)


def require_ffcv(what: str) -> ModuleType:
    """Import ffcv or raise an ``ImportError`` that says exactly what to install."""
    try:
        return importlib.import_module("ffcv")
    except ImportError as error:
        raise ImportError(
            f"{what} needs ffcv, which is not importable ({error}). To get it, {INSTALL_HINT}. "
            "Everything else in masklab works without it: use masklab.pipeline.DatasetLoader "
            "for in-memory tensors or any torch Dataset."
        ) from error


def ffcv_available() -> bool:
    try:
        importlib.import_module("ffcv")
    except ImportError:
        return False
    return True
