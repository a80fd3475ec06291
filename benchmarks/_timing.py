"""Helpers shared by the benchmark scripts: timing, and the figures ``masklab bench`` reads back."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch


def synchronize() -> None:
    """Wait until the device has run everything queued, so a host timer measures the work itself.

    CUDA (and any other ``torch.accelerator``) runs kernels asynchronously: without this, a timer
    around a GPU call measures only the launch. On a CPU it does nothing.
    """
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        accelerator.synchronize()
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs, after one warm-up run; the device is
    synchronised before each start and after each run (:func:`synchronize`)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON (masklab bench)")


class Figures:
    """What one benchmark measured, in a form ``masklab bench`` turns into its report.

    ``compare`` records a ratio of masklab against a reference (a speed-up:
    above 1 means masklab is faster); ``figure`` records any other number,
    such as a share of a training step.
    """

    def __init__(self, benchmark: str, setting: str) -> None:
        self.benchmark, self.setting = benchmark, setting
        self.comparisons: list[dict] = []
        self.figures: list[dict] = []

    def compare(
        self, name: str, ours: float, reference_name: str, reference: float, unit: str, higher_is_better: bool = False
    ) -> float:
        ratio = ours / reference if higher_is_better else reference / ours
        self.comparisons.append(
            {"name": name, "ours": ours, "reference_name": reference_name, "reference": reference, "unit": unit}
            | {"ratio": ratio}
        )
        return ratio

    def figure(self, name: str, value: float, unit: str) -> None:
        self.figures.append({"name": name, "value": value, "unit": unit})

    def save(self, path: str | None) -> None:
        """Write the figures to ``path`` (a temporary name, then renamed); nothing when ``path`` is None."""
        if path is None:
            return
        data = {
            "benchmark": self.benchmark,
            "setting": self.setting,
            "comparisons": self.comparisons,
            "figures": self.figures,
        }
        from masklab.pipeline import write_text_atomically

        write_text_atomically(path, json.dumps(data, indent=1))
