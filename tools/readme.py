"""Generated README sections: the text between ``<!-- TAG:start -->`` and ``<!-- TAG:end -->``."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["readme_section", "update_readme"]


def _markers(tag: str) -> tuple[str, str]:
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def readme_section(readme: Path, tag: str) -> str:
    """The README's text between the ``tag`` markers (what :func:`update_readme` wrote)."""
    start, end = _markers(tag)
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} section to replace")
    return text.split(start + "\n", 1)[1].split(end, 1)[0]


def update_readme(readme: Path, tag: str, markdown: str, copies: dict[Path, str] | None = None) -> None:
    """Replace the README's text between ``<!-- TAG:start -->`` and ``<!-- TAG:end -->`` with ``markdown``.

    ``copies`` maps files (a chart, the figures) to paths relative to the
    README where they are copied, so the README's links and the figures
    behind its tables live in the repository. The README is written to a
    temporary name and renamed.
    """
    from masklab.pipeline import write_text_atomically

    start, end = _markers(tag)
    old = readme_section(readme, tag)  # raises, naming the markers, before anything is copied
    for source, target in (copies or {}).items():
        (readme.parent / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, readme.parent / target)
    text = readme.read_text()
    write_text_atomically(readme, text.replace(f"{start}\n{old}{end}", f"{start}\n{markdown}{end}", 1))
