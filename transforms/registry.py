"""The mask-stage registry: each stage declares its name, options and needs beside its class.

Config loading, building, the compatibility matrix, ``masklab list``,
``show-masks`` and the contract test all read :data:`MASKS`; nothing keeps a
second list of mask names. A new mask stage is its module (a class with
:func:`register_mask`), its test and optionally a YAML recipe.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any, Generic, TypeVar

from torch import nn

__all__ = [
    "MASKS",
    "MaskContext",
    "MaskEntry",
    "MaskOptions",
    "Registry",
    "import_modules",
    "option_names",
    "register_mask",
]

EMITS = ("patch", "mix", "feature")
"""What a stage puts in the batch: a ``PatchMask`` in ``batch.mask``, ``batch.mix``, or feature masks in
``batch.extras``. An objective declares which of these it takes (``None``: none, two clean views)."""

FAMILIES = ("vit", "cnn")
GUIDES = ("saliency", "affinity", "difficulty")
"""The guidance an objective may offer a stage (``guidance(kind)``): ``saliency`` ``(B, Gh, Gw)`` (AMT),
``affinity`` ``(B, N, N)`` (EHM), ``difficulty`` ``(B, Gh, Gw)``, each patch's predicted loss (HPM)."""


@dataclass
class MaskOptions:
    """Base of every mask stage's options; an options dataclass is also the config's ``mask`` section.

    Subclasses add typed fields with defaults (``ratio: float = 0.75``); ``name`` selects the stage.
    """

    name: str = "none"


@dataclass(frozen=True)
class MaskContext:
    """What the recipe knows when it builds a stage, beyond the stage's options.

    Attributes:
        patch_size: the mask grid's cell in pixels (the ViT's patch; 1/8 of the image side for CNNs).
        image_size: the training images' side in pixels.
        num_samples: the dataset's size (a per-image cache, as AMT's, has one row per image).
    """

    patch_size: int
    image_size: int
    num_samples: int = 1

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


@dataclass(frozen=True)
class MaskEntry:
    """One registered mask stage.

    Attributes:
        name: what ``mask.name`` says.
        options: the options dataclass (also the config's ``mask`` section for this stage).
        build: ``(options, context) -> stage``, or ``None`` for no stage.
        small: ``(patch_size, image_size) -> options`` that suit small images (tests, pictures).
        emits: one of :data:`EMITS`, or ``None`` (no mask).
        families: the backbone families the stage works with.
        guide: the model guidance the stage needs (one of :data:`GUIDES`), or ``None``.
        coarse_cell: an option holding a cell side in pixels coarser than the patch, which the
            image must tile and whose cells the ratio counts (SimMIM's and AMT's ``mask_patch_size``;
            ``None`` in the options: single patches).
        stage: the stage class (``None`` for no stage).
    """

    name: str
    options: type[MaskOptions]
    build: Callable[[MaskOptions, MaskContext], nn.Module | None]
    small: Callable[[int, int], MaskOptions]
    emits: str | None
    families: tuple[str, ...] = FAMILIES
    guide: str | None = None
    coarse_cell: str | None = None
    stage: type | None = None

    def section(self, **values: Any) -> MaskOptions:
        """The options with this entry's name: the config section a recipe reads."""
        return self.options(name=self.name, **values)


E = TypeVar("E")


class Registry(Generic[E]):
    """Entries by name, iterated in name order; an unknown name is an error naming the close ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, E] = {}

    def add(self, entry: E) -> E:
        """Register ``entry`` under its name; a name registered already is a :class:`ValueError`."""
        name = entry.name
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register an entry of their own remove it after)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> E:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}; {hint}known: {', '.join(self.names())}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter([self._entries[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def option_names(options: type) -> list[str]:
    """The option fields of an options dataclass, ``name`` left out."""
    return [f.name for f in fields(options) if f.name != "name"]


def import_modules(package: str, path: Iterable[str]) -> None:
    """Import every public module of ``package``, so the registrations in them run.

    A package's ``__init__`` calls it with its ``__name__`` and ``__path__``; a new
    module then needs no line there to be found.
    """
    for module in pkgutil.iter_modules(path):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")


def check_choice(what: str, value: object, allowed: tuple) -> None:
    """Raise a :class:`ValueError` naming ``what``, ``value`` and ``allowed`` unless ``value`` is in ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


MASKS: Registry[MaskEntry] = Registry("mask")
"""Every mask stage by name (``none``: no stage)."""


def register_mask(
    name: str,
    *,
    options: type[MaskOptions],
    emits: str,
    small: Callable[[int, int], MaskOptions],
    families: tuple[str, ...] = FAMILIES,
    coarse_cell: str | None = None,
) -> Callable[[type], type]:
    """Class decorator: register a mask stage under ``name``.

    The class builds itself from its options with a ``from_options(options, context)``
    classmethod; the guidance it needs is its ``guide_kind`` class attribute, if any.

    Args:
        name: what ``mask.name`` says.
        options: a :class:`MaskOptions` dataclass.
        emits: one of :data:`EMITS`.
        small: ``(patch_size, image_size) -> options`` that suit small images.
        families: the backbone families the stage works with.
        coarse_cell: see :class:`MaskEntry`.

    Examples:
        >>> entry = MASKS["simmim"]
        >>> entry.emits, entry.guide, entry.coarse_cell
        ('patch', None, 'mask_patch_size')
        >>> entry.build(entry.small(4, 32), MaskContext(patch_size=4, image_size=32))
        SimMIMMask(ratio=0.6, mask_patch_size=8, patch_size=4)
    """
    check_choice("emits", emits, EMITS)
    if not issubclass(options, MaskOptions):
        raise TypeError(f"options of mask {name!r} must subclass MaskOptions, got {options.__name__}")

    def register(cls: type) -> type:
        guide = getattr(cls, "guide_kind", None)
        if guide is not None:
            check_choice(f"{cls.__name__}.guide_kind", guide, GUIDES)
        MASKS.add(
            MaskEntry(
                name=name,
                options=options,
                build=cls.from_options,
                small=lambda patch_size, image_size: replace(small(patch_size, image_size), name=name),
                emits=emits,
                families=tuple(families),
                guide=guide,
                coarse_cell=coarse_cell,
                stage=cls,
            )
        )
        return cls

    return register


MASKS.add(
    MaskEntry(
        name="none",
        options=MaskOptions,
        build=lambda options, context: None,
        small=lambda patch_size, image_size: MaskOptions(),
        emits=None,
    )
)
