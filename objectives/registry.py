"""The objective registry: each objective declares its name, options and needs beside its class.

Config loading, building, the compatibility matrix (derived: an objective
takes every mask stage that emits what it reads, on the families both
support, whose guidance it offers), ``masklab list`` and the contract test
read :data:`OBJECTIVES`; nothing keeps a second list of objective names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from masklab.transforms import MaskOptions, Registry
from masklab.transforms.registry import EMITS, FAMILIES, GUIDES, check_choice

__all__ = ["OBJECTIVES", "ObjectiveEntry", "ObjectiveOptions", "register_objective"]


@dataclass
class ObjectiveOptions:
    """Base of every objective's options; an options dataclass is also the config's ``objective`` section.

    Subclasses add typed fields with defaults; ``name`` selects the objective.
    """

    name: str = ""


Build = Callable[[nn.Module, ObjectiveOptions, MaskOptions], nn.Module]
"""``(backbone, options, mask options) -> objective``; the mask's options are there for objectives
that must agree with their stage (MaskDeep's strides and groups)."""


@dataclass(frozen=True)
class ObjectiveEntry:
    """One registered objective.

    Attributes:
        name: what ``objective.name`` says.
        options: the options dataclass (also the config's ``objective`` section for it).
        build: see :data:`Build`.
        small: ``() -> options`` with small heads, for tests on small images.
        takes: what it reads from the mask stage (one of ``masklab.transforms.registry.EMITS``), or
            ``None``: no mask stage.
        families: the backbone families it supports.
        guides: the guidance it offers mask stages (of ``masklab.transforms.registry.GUIDES``).
        views: the augmented views it needs per image (0: the image itself).
        objective: the class.
    """

    name: str
    options: type[ObjectiveOptions]
    build: Build
    small: Callable[[], ObjectiveOptions]
    takes: str | None
    families: tuple[str, ...] = FAMILIES
    guides: tuple[str, ...] = ()
    views: int = 0
    objective: type | None = None

    def section(self, **values: Any) -> ObjectiveOptions:
        """The options with this entry's name: the config section a recipe reads."""
        return self.options(name=self.name, **values)


OBJECTIVES: Registry[ObjectiveEntry] = Registry("objective")
"""Every pretraining objective by name."""


def register_objective(
    name: str,
    *,
    options: type[ObjectiveOptions],
    takes: str | None,
    families: tuple[str, ...] = FAMILIES,
    views: int = 0,
    build: Build | None = None,
    small: Callable[[], ObjectiveOptions] | None = None,
) -> Callable[[type], type]:
    """Class decorator (or, called on a class, a registration): register an objective under ``name``.

    Args:
        name: what ``objective.name`` says.
        options: an :class:`ObjectiveOptions` dataclass.
        takes: what it reads from the mask stage, or ``None``.
        families: the backbone families it supports.
        views: the augmented views it needs per image.
        build: ``(backbone, options, mask options) -> objective``; default the class's
            ``from_options`` classmethod.
        small: options for small images; default the options' defaults.

    The guidance it offers is its ``guides`` class attribute, if any.

    Examples:
        >>> entry = OBJECTIVES["maskdeep"]
        >>> entry.takes, entry.views, entry.families, entry.guides
        ('feature', 2, ('cnn', 'vit'), ('saliency', 'affinity'))
    """
    if takes is not None:
        check_choice("takes", takes, EMITS)
    if not issubclass(options, ObjectiveOptions):
        raise TypeError(f"options of objective {name!r} must subclass ObjectiveOptions, got {options.__name__}")
    small_options = small or options

    def register(cls: type) -> type:
        guides = tuple(getattr(cls, "guides", ()))
        for guide in guides:
            check_choice(f"{cls.__name__}.guides", guide, GUIDES)
        OBJECTIVES.add(
            ObjectiveEntry(
                name=name,
                options=options,
                build=build or cls.from_options,
                small=lambda: replace(small_options(), name=name),
                takes=takes,
                families=tuple(families),
                guides=guides,
                views=views,
                objective=cls,
            )
        )
        return cls

    return register
