"""Which objective takes which backbone family and which masks: derived from the two registries.

An objective takes every mask stage that emits what it reads (``takes`` and
``emits``), whose guidance it offers, on the backbone families both support.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from masklab.transforms import MASKS, MaskEntry, option_names

from .registry import OBJECTIVES, ObjectiveEntry

__all__ = [
    "Support",
    "check_compatible",
    "check_family",
    "compatibility",
    "compatibility_table",
    "mask_table",
    "supported_triples",
]


@dataclass(frozen=True)
class Support:
    families: tuple[str, ...]
    masks: tuple[str, ...]


def takes(objective: ObjectiveEntry, mask: MaskEntry) -> bool:
    """Whether ``objective`` can train on ``mask``'s batches (on some family both support)."""
    return (
        mask.emits == objective.takes
        and (mask.guide is None or mask.guide in objective.guides)
        and bool(set(mask.families) & set(objective.families))
    )


def compatibility() -> dict[str, Support]:
    """Objective name -> the backbone families and mask stages (``MASKS`` names) it takes.

    ``"none"``: no mask stage (the siamese baselines, on two views).
    """
    return {
        objective.name: Support(objective.families, tuple(m.name for m in MASKS if takes(objective, m)))
        for objective in OBJECTIVES
    }


def check_compatible(objective: str, family: str | None = None, mask: str | None = None) -> None:
    """Raise ``ValueError`` saying what is supported if ``objective`` cannot take ``family`` or ``mask``."""
    support = compatibility()[OBJECTIVES[objective].name]
    if family is not None and family not in support.families:
        raise ValueError(
            f"objective {objective!r} does not take {family!r} backbones; it supports backbone families "
            f"{list(support.families)} with masks {list(support.masks)}"
        )
    if mask is not None and mask not in support.masks:
        raise ValueError(
            f"objective {objective!r} does not take the {mask!r} mask; it supports masks {list(support.masks)} "
            f"on backbone families {list(support.families)}"
        )
    if mask is not None and family is not None and family not in MASKS[mask].families:
        raise ValueError(
            f"mask {mask!r} does not work on {family!r} backbones; it supports {list(MASKS[mask].families)}"
        )


def check_family(objective: str, backbone: nn.Module) -> None:
    """Raise :class:`ValueError` if ``objective`` does not support ``backbone``'s family (``vit`` or ``cnn``)."""
    from .backbones import backbone_family

    check_compatible(objective, family=backbone_family(backbone))


def supported_triples(backbones: dict[str, str]) -> list[tuple[str, str, str]]:
    """Every supported ``(backbone, mask, objective)`` for ``backbones`` (name -> family)."""
    return [
        (backbone, mask, objective)
        for objective, support in compatibility().items()
        for backbone, family in backbones.items()
        if family in support.families
        for mask in support.masks
        if family in MASKS[mask].families
    ]


def compatibility_table() -> str:
    """The matrix as a Markdown table (the README shows exactly this)."""
    lines = ["| objective | backbone families | masks |", "|---|---|---|"]
    for objective, support in compatibility().items():
        lines.append(f"| `{objective}` | {', '.join(support.families)} | {', '.join(support.masks)} |")
    return "\n".join(lines)


def mask_table() -> str:
    """Every mask stage with its options (the config's ``mask.*`` keys) and the guidance it needs."""
    lines = ["| mask | stage | options | guidance |", "|---|---|---|---|"]
    for mask in MASKS:
        stage = f"`{mask.stage.__name__}`" if mask.stage else "(none)"
        options = ", ".join(option_names(mask.options)) or "-"
        lines.append(f"| `{mask.name}` | {stage} | {options} | {mask.guide or '-'} |")
    return "\n".join(lines)
