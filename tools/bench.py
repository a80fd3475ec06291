"""``masklab bench``: run every script in ``benchmarks/`` and write one report (Markdown and a PNG chart).

Each script prints its own table and, given ``--json PATH``, writes its
figures (see ``benchmarks/_timing.py``): *comparisons* of masklab against
a reference, as a ratio where above 1 means masklab is faster, and other
*figures* such as a stage's share of a training step. This module runs
the scripts one after another in fresh processes (so one's threads and
compiled code do not colour another's timings), then gathers the figures.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BenchReport",
    "figure_tables",
    "find_benchmarks",
    "machine_description",
    "report_markdown",
    "run_bench",
    "write_report",
]

README_CHART = "docs/bench.png"
README_FIGURES = "docs/bench.json"


@dataclass
class BenchReport:
    """Every script's figures (as its ``--json`` wrote them), its wall time, and the scripts that failed."""

    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # script: the tail of its output
    machine: str = ""
    quick: bool = False
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())

    @classmethod
    def load(cls, path: str | os.PathLike) -> BenchReport:
        """A report as :func:`write_report` saved it in ``bench.json``."""
        return cls(**json.loads(Path(path).read_text()))


def find_benchmarks(folder: str | os.PathLike | None = None) -> Path:
    """The ``benchmarks/`` folder: ``folder`` if given, else the one beside masklab's source.

    Raises:
        FileNotFoundError: no such folder (an installed wheel has no benchmarks; they live in a source checkout).
    """
    import masklab

    candidate = Path(folder) if folder is not None else Path(masklab.__file__).resolve().parent / "benchmarks"
    if not candidate.is_dir() or not _scripts(candidate):
        raise FileNotFoundError(
            f"no benchmark scripts in {candidate}: masklab bench runs the benchmarks/ folder of a source checkout "
            "(git clone the repository and pip install -e it), or pass --dir PATH"
        )
    return candidate


def _scripts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))


def machine_description() -> str:
    """CPU model, cores, memory, accelerator, Python and torch versions, in one line."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages * size / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{memory}, {gpu}; {platform.system()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def run_bench(
    folder: Path,
    quick: bool = False,
    only: Sequence[str] | None = None,
    timeout: float | None = None,
    log: Callable[[str], object] = print,
) -> BenchReport:
    """Run the scripts in ``folder`` (or those named in ``only``, without ``.py``), ``--quick`` if asked.

    A script that fails or runs past ``timeout`` seconds is recorded in
    ``failed`` with the end of its output; the others still run.
    """
    scripts = _scripts(folder)
    if only:
        known = {p.stem: p for p in scripts}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; the scripts are {sorted(known)}")
        scripts = [known[name] for name in only]
    report = BenchReport(machine=machine_description(), quick=quick)
    with tempfile.TemporaryDirectory() as tmp:
        for script in scripts:
            target = Path(tmp) / f"{script.stem}.json"
            command = [sys.executable, str(script), "--json", str(target), *(["--quick"] if quick else [])]
            log(f"$ {' '.join(command[1:])}")
            start = time.perf_counter()
            try:
                done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=timeout)
                output, code = done.stdout + done.stderr, done.returncode
            except subprocess.TimeoutExpired as expired:
                output, code = f"{expired.stdout or ''}\nran past {timeout} s", -1
            report.seconds[script.stem] = time.perf_counter() - start
            log(output.rstrip())
            if code != 0 or not target.exists():
                report.failed[script.stem] = "\n".join(output.rstrip().splitlines()[-15:])
                log(f"{script.name} failed (exit {code})")
                continue
            report.results.append(json.loads(target.read_text()))
    return report


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def figure_tables(figures: dict[str, Any]) -> list[str]:
    """Markdown lines for one benchmark's saved figures (``benchmarks/_timing.Figures``): a table of its
    comparisons (with the ratio), then one of its other figures; each table followed by a blank line."""
    lines: list[str] = []
    if figures.get("comparisons"):
        lines += ["| comparison | measured | reference | unit | ratio |", "|---|---:|---:|---|---:|"]
        for c in figures["comparisons"]:
            lines.append(
                f"| {c['name']} | {_number(c['ours'])} | {_number(c['reference'])} | {c['unit']} | {c['ratio']:.2f}x |"
            )
        lines.append("")
    if figures.get("figures"):
        lines += ["| figure | value | unit |", "|---|---:|---|"]
        lines += [f"| {f['name']} | {_number(f['value'])} | {f['unit']} |" for f in figures["figures"]]
        lines.append("")
    return lines


def report_markdown(report: BenchReport, chart: str | None = "bench.png") -> str:
    """The report: the machine, then per benchmark a table of ratios against references and one of figures."""
    total = sum(report.seconds.values())
    mode = "masklab bench --quick" if report.quick else "masklab bench"
    lines = [
        f"Measured by `{mode}` on {report.date}, {total / 60:.1f} min in all.",
        f"Machine: {report.machine}.",
        "",
        "Ratio: how many times faster the measured contender (masklab's, unless the row names another) is "
        "than the reference; above 1, faster.",
        "",
    ]
    if chart:
        lines += [f"![benchmark ratios]({chart})", ""]
    for result in report.results:
        lines.append(f"**{result['benchmark']}** ({result['setting']}; {report.seconds[result['benchmark']]:.0f} s)")
        lines.append("")
        lines += figure_tables(result)
    for name, tail in report.failed.items():
        lines += [f"**{name}: failed**", "", "```", tail, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def plot_ratios(report: BenchReport, path: Path) -> None:
    """A horizontal bar per comparison, on a log scale, with a line at 1x (masklab as fast as the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{r['benchmark']}: {c['name']}", c["ratio"]) for r in report.results for c in r["comparisons"]]
    if not rows:
        raise ValueError("no comparisons to plot: every benchmark failed or none ran")
    fig, ax = plt.subplots(figsize=(10, 0.36 * len(rows) + 1.2))
    names, ratios = zip(*rows, strict=True)
    colours = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
    ax.barh(range(len(rows)), ratios, color=colours, alpha=0.8)
    for row, ratio in enumerate(ratios):
        ax.text(ratio, row, f" {ratio:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of the measured contender over the reference (log scale; right of the line: faster)")
    ax.set_title("masklab bench" + (" --quick" if report.quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: BenchReport, out: Path) -> tuple[Path, Path | None]:
    """``bench.md``, ``bench.json`` and (when any comparison ran) ``bench.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    chart = out / "bench.png" if any(r["comparisons"] for r in report.results) else None
    if chart is not None:
        plot_ratios(report, chart)
    from masklab.pipeline import write_text_atomically

    markdown = out / "bench.md"
    write_text_atomically(markdown, report_markdown(report, chart.name if chart else None))
    write_text_atomically(out / "bench.json", json.dumps(dataclasses.asdict(report), indent=1))
    return markdown, chart
