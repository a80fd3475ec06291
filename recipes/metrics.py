"""What a run reports while it trains: ``metrics.csv``, the trackers, the progress bar, and the loss plot."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from masklab.pipeline import replace_atomically

if TYPE_CHECKING:
    from accelerate import Accelerator

    from masklab.transforms import PatchMask

__all__ = ["CSV_FIELDS", "RunLog", "flat_config", "keep_rows_until", "plot_losses"]

CSV_FIELDS = ("update", "epoch", "loss", "lr", "images_per_s", "masked_fraction", "thrown_fraction", "knn")
"""``metrics.csv``'s columns; ``knn`` is filled at the updates where the kNN monitor ran (``eval.every_epochs``)."""


def plot_losses(csv_path: Path, png_path: Path) -> None:
    """Plot ``metrics.csv``'s loss against the update into ``png_path`` (nothing for an empty CSV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["update"]) for r in rows], [float(r["loss"]) for r in rows], lw=1)
    ax.set_xlabel("update")
    ax.set_ylabel("loss")
    ax.set_title(png_path.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def keep_rows_until(csv_path: Path, update: int) -> None:
    """On resume, drop the rows a killed run logged after the checkpoint it resumes from."""
    if not csv_path.exists():
        return
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if int(r["update"]) <= update]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    replace_atomically(write, csv_path)


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b": value}`` of scalars, the form trackers take (``None`` as ``"null"``).

    Examples:
        >>> flat_config({"run": {"seed": 0, "resume": None}, "model": {"kwargs": {"depth": 1}}})
        {'run.seed': 0, 'run.resume': 'null', 'model.kwargs.depth': 1}
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = "null" if value is None else value
        else:
            flat[name] = str(value)
    return flat


class NonFiniteLoss(FloatingPointError):
    """Training stopped at a NaN or infinite loss; no checkpoint was written after it."""


class RunLog:
    """``metrics.csv``, the trackers and the progress bar of one run.

    Rows are kept on the device until :meth:`flush`, so logging costs one
    host sync per interval, not per update. Only the main process writes;
    every process must call :meth:`flush` (it averages the loss over ranks).

    Args:
        accelerator: the run's Accelerator (its trackers, its processes).
        out: the run folder.
        config: the run's config as nested dicts, for the trackers.
        total: the updates of the whole run (the progress bar's length).
        start: the update the run starts from (0, or the resumed checkpoint's).
        resumed: whether the run continues a checkpoint: then ``metrics.csv`` keeps its rows up to ``start``.
        progress: show a progress bar (main process only).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        out: Path,
        config: dict[str, Any],
        total: int,
        start: int = 0,
        resumed: bool = False,
        progress: bool = True,
    ) -> None:
        from tqdm.auto import tqdm

        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.csv = Path(out) / "metrics.csv"
        self.losses: list[float] = []  # every update's loss, averaged over ranks
        self.pending: list[dict[str, Any]] = []
        self.skipped: set[int] = set()
        self.last_finite: tuple[int, float] | None = None
        self.tick, self.seen = time.perf_counter(), 0
        if self.main:
            if resumed:
                keep_rows_until(self.csv, start)
            accelerator.init_trackers("masklab", config=flat_config(config), init_kwargs={"wandb": {"dir": str(out)}})
            if not resumed or not self.csv.exists():
                with open(self.csv, "w", newline="") as f:
                    csv.DictWriter(f, fieldnames=CSV_FIELDS).writeheader()
        self.bar = tqdm(
            total=total, initial=start, disable=not (self.main and progress), desc=Path(out).name, dynamic_ncols=True
        )

    def saw(self, images: int) -> None:
        """Count ``images`` trained on by this process (for images/s)."""
        self.seen += images

    def record(
        self, update: int, epoch: int, loss: torch.Tensor, lr: float, mask: PatchMask | None, skipped: bool = False
    ) -> None:
        """Keep an update's row; ``loss`` stays on its device until :meth:`flush`.

        ``skipped``: the update's loss was not finite and the loop skipped it (``run.skip_nonfinite``).
        """
        if skipped:
            self.skipped.add(update)
        self.pending.append(
            {
                "update": update,
                "epoch": epoch,
                "loss": loss.detach(),
                "lr": lr,
                "masked_fraction": mask.num_masked / mask.num_cells if mask is not None else 0.0,
                "thrown_fraction": mask.num_thrown / mask.num_cells if mask is not None else 0.0,
            }
        )

    def note(self, **scores: float) -> None:
        """Add ``scores`` (e.g. ``knn``) to the last recorded update's row and log them to the trackers."""
        if not self.pending:
            raise RuntimeError("note() follows record() of the update the scores belong to")
        row = self.pending[-1]
        row.update(scores)
        if self.main:
            self.accelerator.log(dict(scores), step=row["update"])

    def flush(self) -> None:
        """Average the kept losses over ranks, write their rows, log the last, advance the bar."""
        if not self.pending:
            return
        values = self.accelerator.reduce(torch.stack([p["loss"] for p in self.pending]), reduction="mean").tolist()
        now = time.perf_counter()
        rate = self.seen * self.accelerator.num_processes / (now - self.tick)
        self.tick, self.seen = now, 0
        for row, value in zip(self.pending, values, strict=True):
            row.update(loss=value, images_per_s=rate)
        bad = self._first_bad(values)
        self.losses += values
        if self.main:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_FIELDS).writerows(self.pending)
            last = self.pending[-1]
            self.accelerator.log({"loss": values[-1], "lr": last["lr"], "images_per_s": rate}, step=last["update"])
        self.bar.update(len(self.pending))
        self.bar.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{rate:.0f}")
        self.pending = []
        if bad is not None:
            update, value = bad
            last = (
                "no finite loss before it"
                if self.last_finite is None
                else (f"the last finite loss was {self.last_finite[1]:.6g} at update {self.last_finite[0]}")
            )
            raise NonFiniteLoss(
                f"the loss is {value} at update {update}; {last}. No checkpoint was written after it: resume "
                "from the last one (--resume auto) with a lower optim.lr or optim.clip_grad, or set "
                "run.skip_nonfinite=K to skip up to K such updates"
            )

    def _first_bad(self, values: list[float]) -> tuple[int, float] | None:
        """The first row of ``values`` whose loss is not finite and was not skipped; notes the last finite one."""
        for row, value in zip(self.pending, values, strict=True):
            if math.isfinite(value):
                self.last_finite = (row["update"], value)
            elif row["update"] not in self.skipped:
                return row["update"], value
        return None

    def close(self) -> None:
        """Close the bar and plot the losses (``loss.png`` beside the CSV)."""
        self.bar.close()
        if self.main:
            plot_losses(self.csv, self.csv.parent / "loss.png")
