"""The run folder (``run.out``): one writer at a time, no run's outputs lost, resumes that match their checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, CheckpointError, list_checkpoints, load_checkpoint, remove_path
from .config import TrainConfig, to_dict

__all__ = [
    "LOCK_FILE",
    "RESUMABLE_CHANGES",
    "RunFolderError",
    "RunLock",
    "check_process_change",
    "check_resumed_config",
    "config_changes",
    "config_defaults",
    "find_resume",
    "prepare_fresh_run",
]

logger = logging.getLogger(__name__)

LOCK_FILE = "masklab.lock"
CHECKPOINTS = "checkpoints"
# What a run writes besides its checkpoints and config.yaml; "masklab" is the TensorBoard tracker's folder.
OUTPUTS = ("metrics.csv", "eval.json", "loss.png", "masklab")
# Config keys a resumed run may change: they leave the schedule, the model and the data as they were.
RESUMABLE_CHANGES = (
    "run.log_every",
    "run.progress",
    "run.stop_at",
    "run.resume",
    "run.overwrite",
    "run.trust_checkpoint",
    "run.ckpt_every",
    "run.keep",
    "run.out",
    "run.device",
    "run.record_indices",
    "data.num_workers",
    "eval.",
)
_MISSING = "<absent>"


class RunFolderError(ValueError):
    """A run folder that may not be written (in use, holding another run, not writable) or resumed as asked."""


def _not_writable(folder: Path, error: OSError) -> Exception:
    if error.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"the disk is full: nothing can be written to {folder}")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunFolderError(
            f"run.out {folder} is not writable ({error.strerror}): choose another run.out or make it writable"
        )
    return error


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class RunLock:
    """A lock file in the run folder naming its holder (PID and host), so a second writer is refused.

    A lock whose holder no longer runs on this host is stale and is taken
    over with a warning. Use as a context manager, or :meth:`acquire` and
    :meth:`release` (which only removes a lock this process holds).

    Args:
        folder: the run folder (made if missing).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            return True  # unreadable: the lock is written whole (hard link), so no live writer made it
        if holder.get("host") != socket.gethostname():
            return False  # cannot tell whether a process on another machine runs
        return not _alive(int(holder.get("pid", -1)))

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            RunFolderError: another live process holds it (named), or the folder is not writable.
            OSError: the disk is full.
        """
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.folder / f".{LOCK_FILE}.{os.getpid()}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(me))
            for attempt in range(2):
                try:
                    os.link(tmp, self.path)  # atomic: fails if a lock exists, and never shows a half-written one
                    self.held = True
                    return
                except FileExistsError:
                    holder = self._holder()
                    if attempt > 0 or not self._stale(holder):
                        raise self._in_use(holder) from None
                    who = "unreadable" if holder is None else f"PID {holder.get('pid')} on {holder.get('host')}"
                    logger.warning("taking over the stale lock %s (its holder, %s, no longer runs)", self.path, who)
                    self.path.unlink(missing_ok=True)
        except OSError as error:
            raise _not_writable(self.folder, error) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _in_use(self, holder: dict[str, Any] | None) -> RunFolderError:
        who = f"PID {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}" if holder else "?"
        return RunFolderError(
            f"run.out {self.folder} is in use by another run ({who}; lock file {self.path}): two runs writing one "
            f"folder mix their metrics and checkpoints. Wait for it to end, choose another run.out, or delete "
            f"{self.path} if that run no longer exists"
        )

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def prepare_fresh_run(folder: str | os.PathLike, overwrite: bool) -> list[Path]:
    """Make ``folder`` ready for a run that starts from update 0; returns what was deleted.

    A folder holding a previous run's metrics or checkpoints is refused
    unless ``overwrite``: then those outputs are deleted first, so the new
    run's keep-last-N rotation cannot delete its own checkpoints in favour of
    the old run's higher-numbered ones. Partial checkpoint folders left by a
    killed writer are deleted either way.

    Raises:
        RunFolderError: previous outputs and no ``overwrite``; the message names the folder and
            both ways on (``--resume``, ``--overwrite``).
    """
    folder = Path(folder)
    checkpoints = folder / CHECKPOINTS
    for partial in checkpoints.glob(".ckpt-*.tmp"):
        logger.info("deleting %s, a checkpoint whose writing was interrupted", partial)
        remove_path(partial)
    found = [folder / name for name in OUTPUTS if (folder / name).exists()] + list_checkpoints(checkpoints)
    if not any(p.name == "metrics.csv" or p.parent == checkpoints for p in found):
        return []
    if not overwrite:
        names = ", ".join(str(p.relative_to(folder)) for p in found)
        raise RunFolderError(
            f"run.out {folder} holds a previous run's outputs ({names}). Continue it with --resume auto "
            "(run.resume=auto), or delete them and start afresh with --overwrite (run.overwrite=true), "
            "or choose another run.out"
        )
    logger.warning("--overwrite: deleting the previous run's outputs in %s: %s", folder, [p.name for p in found])
    for path in found:
        remove_path(path)
    return found


def find_resume(cfg: TrainConfig, announce: bool = True) -> Checkpoint | None:
    """The checkpoint ``cfg.run.resume`` names, read (training state included), or ``None`` to start afresh.

    ``auto`` takes the newest checkpoint in the run's folder that loads,
    logging each newer one it skips and why; with none at all it logs that
    the run starts afresh (when ``announce``: the main process).

    Raises:
        FileNotFoundError: a named checkpoint does not exist.
        CheckpointError: a named checkpoint cannot or may not be read.
        RunFolderError: ``auto`` found checkpoints but none loads (each reason listed).
    """
    resume, trust = cfg.run.resume, cfg.run.trust_checkpoint
    if resume is None:
        return None
    if resume != "auto":
        return load_checkpoint(resume, trust=trust)
    folder = Path(cfg.run.out) / CHECKPOINTS
    found = list_checkpoints(folder)
    if not found:
        if announce:
            logger.warning("--resume auto: no checkpoint in %s, so this run starts afresh", folder)
        return None
    skipped = []
    for path in reversed(found):
        try:
            return load_checkpoint(path, trust=trust)
        except CheckpointError as error:
            skipped.append(f"{path.name}: {error}")
            if announce:
                logger.warning("--resume auto: skipping %s, which does not load: %s", path, error)
    raise RunFolderError(f"--resume auto: none of the checkpoints in {folder} loads:\n  " + "\n  ".join(skipped))


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_defaults(config: Any, prefix: str = "") -> dict[str, Any]:
    """Each leaf field of a config dataclass (a :class:`TrainConfig`, its sections as they are: a mask's own
    options class, say) and that class's default, keyed ``section.field``."""
    import dataclasses

    found: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found.update(config_defaults(value, f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            found[prefix + f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[prefix + f.name] = f.default_factory()
    return found


def config_changes(
    old: dict[str, Any],
    new: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    may_change: tuple[str, ...] = RESUMABLE_CHANGES,
) -> list[str]:
    """``key: old -> new`` for each key that differs and changes the schedule, the model or the data.

    Keys in ``may_change`` (:data:`RESUMABLE_CHANGES`; a prefix ending in ``.`` covers its section) may
    differ; a key ``old`` lacks (written before the key existed) counts as its default: ``defaults``
    (:func:`config_defaults` of the new config, whose sections' own classes know their keys), else a default
    :class:`TrainConfig`'s.
    """
    if defaults is None:
        defaults = _flat(to_dict(TrainConfig()))
    before, after = _flat(old), _flat(new)
    changes = []
    for key in sorted(set(before) | set(after)):
        if key.startswith(may_change):
            continue
        a, b = before.get(key, defaults.get(key, _MISSING)), after.get(key, _MISSING)
        if a != b:
            changes.append(f"{key}: {a!r} -> {b!r}")
    return changes


def check_process_change(checkpoint: Checkpoint, cfg: TrainConfig, processes: int) -> None:
    """Refuse a resume on another number of processes unless the global batch stays the same.

    The global batch is ``data.batch_size`` x processes. Kept equal, every update sees the same
    number of images, the schedule's updates per epoch are the same, and the loader's position
    (global batches of one shared epoch order) means the same images on any number of processes.

    Raises:
        RunFolderError: the global batch would change (the message gives the per-process batch
            that keeps it, when there is one).
    """
    old_processes = int(checkpoint.state.get("processes", processes)) if checkpoint.state else processes
    old_batch = int(((checkpoint.config or {}).get("data") or {}).get("batch_size", cfg.data.batch_size))
    if old_processes == processes and old_batch == cfg.data.batch_size:
        return
    before, after = old_batch * old_processes, cfg.data.batch_size * processes
    if before == after:
        return
    fits = before % processes == 0
    hint = (
        f"set data.batch_size={before // processes}" if fits else f"no per-process batch gives {before} on {processes}"
    )
    raise RunFolderError(
        f"resuming {checkpoint.path} (data.batch_size={old_batch} on {old_processes} process(es), a global batch of "
        f"{before}) on {processes} process(es) with data.batch_size={cfg.data.batch_size} changes the global batch to "
        f"{after}: {hint}, so the schedule and the loader position carry over"
    )


def check_resumed_config(checkpoint: Checkpoint, cfg: TrainConfig, processes: int = 1) -> None:
    """Refuse to resume ``checkpoint`` under a config that changes its schedule, model or data.

    ``data.batch_size`` may change with the number of ``processes`` when the global batch stays
    the same (:func:`check_process_change`).

    Raises:
        CheckpointError: the checkpoint records no config.
        RunFolderError: the keys that differ, each as ``key: old -> new``.
    """
    if checkpoint.config is None:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} records no training config, so a resume cannot check that it "
            "continues the same run; use a checkpoint written by masklab train"
        )
    changes = config_changes(checkpoint.config, to_dict(cfg), config_defaults(cfg))
    old_processes = int(checkpoint.state.get("processes", processes)) if checkpoint.state else processes
    if old_processes != processes:  # data.batch_size may change with them, the global batch may not
        check_process_change(checkpoint, cfg, processes)
        changes = [c for c in changes if not c.startswith("data.batch_size:")]
    if changes:
        allowed = ", ".join(k + ("*" if k.endswith(".") else "") for k in RESUMABLE_CHANGES)
        raise RunFolderError(
            f"resuming {checkpoint.path} with a config that changes the schedule, the model or the data:\n  "
            + "\n  ".join(changes)
            + f"\nResume with the checkpoint's values, or start a new run in another run.out. A resume may change: {allowed}"
        )
