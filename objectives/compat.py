"""Which objective takes which backbone family and which masks: declared once, checked everywhere."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COMPATIBILITY", "Support", "check_compatible", "check_family", "compatibility_table", "supported_triples"]


@dataclass(frozen=True)
class Support:
    families: tuple[str, ...]
    masks: tuple[str, ...]


COMPATIBILITY: dict[str, Support] = {
    "mae": Support(families=("vit",), masks=("random", "block", "simmim", "amt", "ehm")),
    "simmim": Support(families=("vit", "cnn"), masks=("random", "block", "simmim", "amt", "ehm")),
    "moco": Support(families=("vit", "cnn"), masks=("none",)),
    "byol": Support(families=("vit", "cnn"), masks=("none",)),
    "simsiam": Support(families=("vit", "cnn"), masks=("none",)),
    "mixmask_moco": Support(families=("vit", "cnn"), masks=("mixmask",)),
    "mixmask_byol": Support(families=("vit", "cnn"), masks=("mixmask",)),
    "mixmask_simsiam": Support(families=("vit", "cnn"), masks=("mixmask",)),
    "maskdeep": Support(families=("cnn", "vit"), masks=("feature",)),
}
"""objective name -> the backbone families and mask stages (``masklab.transforms.MASK_STAGES`` names) it takes.

``"none"``: two views and no mask stage (the siamese baselines)."""


def _support(objective: str) -> Support:
    if objective not in COMPATIBILITY:
        raise ValueError(f"unknown objective {objective!r}; known: {sorted(COMPATIBILITY)}")
    return COMPATIBILITY[objective]


def check_compatible(objective: str, family: str | None = None, mask: str | None = None) -> None:
    """Raise ``ValueError`` saying what is supported if ``objective`` cannot take ``family`` or ``mask``."""
    support = _support(objective)
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


def check_family(objective: str, backbone) -> None:
    from .backbones import backbone_family

    check_compatible(objective, family=backbone_family(backbone))


def supported_triples(backbones: dict[str, str]) -> list[tuple[str, str, str]]:
    """Every supported ``(backbone, mask, objective)`` for ``backbones`` (name -> family)."""
    return [
        (backbone, mask, objective)
        for objective, support in COMPATIBILITY.items()
        for backbone, family in backbones.items()
        if family in support.families
        for mask in support.masks
    ]


def compatibility_table() -> str:
    """The declaration as a Markdown table (the README shows exactly this)."""
    lines = ["| objective | backbone families | masks |", "|---|---|---|"]
    for objective, support in COMPATIBILITY.items():
        lines.append(f"| `{objective}` | {', '.join(support.families)} | {', '.join(support.masks)} |")
    return "\n".join(lines)
