"""Small studies: recipes against each other at equal steps, several seeds, kNN accuracy."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

__all__ = ["run_study"]


def run_study(
    recipes: list[str],
    seeds: list[int],
    out: Path,
    overrides: list[str] | None = None,
    per_recipe: dict[str, list[str]] | None = None,
) -> dict[str, dict[str, float]]:
    """Train every recipe with every seed (same data, same steps) and report kNN accuracy.

    Writes ``results.json`` (every run) and ``results.md`` (mean and spread) in ``out``.
    """
    from .config import load_config
    from .train import train

    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[float]] = {}
    for recipe in recipes:
        for seed in seeds:
            cfg = load_config(
                recipe,
                [
                    *(overrides or []),
                    *((per_recipe or {}).get(recipe, [])),
                    f"run.seed={seed}",
                    f"run.out={out / f'{recipe}-seed{seed}'}",
                ],
            )
            result = train(cfg)
            runs.setdefault(recipe, []).append(float(result.knn))
            (out / "results.json").write_text(json.dumps(runs, indent=1))
    summary = {
        recipe: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
        for recipe, v in runs.items()
    }
    lines = ["| recipe | kNN accuracy (mean ± std) | runs |", "|---|---:|---:|"]
    for recipe, s in summary.items():
        values = ", ".join(f"{x:.3f}" for x in runs[recipe])
        lines.append(f"| {recipe} | {s['mean']:.3f} ± {s['std']:.3f} | {values} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return summary
