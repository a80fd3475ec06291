"""Every `Examples:` block in the public modules runs and shows what it says."""

import doctest
import importlib
import pkgutil

import pytest

import masklab

MODULES = sorted(
    info.name
    for package in ("pipeline", "transforms", "objectives", "recipes")
    for info in pkgutil.walk_packages(importlib.import_module(f"masklab.{package}").__path__, f"masklab.{package}.")
    if not info.name.endswith("_ffcv_decode")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_version():
    assert masklab.__version__
