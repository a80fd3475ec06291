"""Every `Examples:` block in the public modules runs and shows what it says; the public API is typed and documented."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import masklab

PACKAGES = ("pipeline", "transforms", "objectives", "recipes")


def _modules(packages):
    """Every module of ``masklab.PACKAGE`` for each of ``packages``, sorted."""
    return sorted(
        info.name
        for package in packages
        for info in pkgutil.walk_packages(importlib.import_module(f"masklab.{package}").__path__, f"masklab.{package}.")
    )


MODULES = [name for name in _modules(PACKAGES) if not name.endswith("_ffcv_decode")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_version():
    assert masklab.__version__


def _public_functions(module):
    """``(qualified name, function)`` of every public function and public method (and ``__init__``) that
    ``module`` defines (not what it imports, nor what ``typing`` writes for a ``Protocol``)."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if (attr == "__init__" or not attr.startswith("_")) and inspect.isfunction(fn):
                    if fn.__module__ == module.__name__:
                        yield f"{name}.{attr}", fn


TYPED = [name for name in _modules((*PACKAGES, "tools")) if not name.rsplit(".", 1)[-1].startswith("_")]


@pytest.mark.parametrize("name", TYPED)
def test_public_api_is_typed(name):
    module = importlib.import_module(name)
    untyped = []
    for qualname, fn in _public_functions(module):
        missing = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls", *fn.__annotations__)]
        if not qualname.endswith("__init__") and "return" not in fn.__annotations__:
            missing.append("return")
        if missing:
            untyped.append(f"{qualname}: {missing}")
    assert not untyped, f"public functions of {name} without type hints: {untyped}"


def _documented(module, qualname: str, fn) -> bool:
    """``fn`` has a docstring, or is a method that a documented base class method of the same name describes, or a
    ``Protocol``'s stub (``...``)."""
    if fn.__doc__ or qualname.endswith("__init__"):
        return True
    if "." not in qualname:
        return False
    cls = getattr(module, qualname.split(".")[0])
    name = qualname.rsplit(".", 1)[1]
    if getattr(cls, "_is_protocol", False):
        return True
    return any(getattr(vars(base).get(name), "__doc__", None) for base in cls.__mro__[1:])


@pytest.mark.parametrize("name", TYPED)
def test_public_api_is_documented(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no module docstring"
    bare = [q for q, fn in _public_functions(module) if not _documented(module, q, fn)]
    assert not bare, f"public functions of {name} without a docstring: {bare}"
