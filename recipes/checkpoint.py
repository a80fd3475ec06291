"""Checkpoints written through Accelerate that cannot run code when read.

A checkpoint is a folder ``ckpt-UPDATE/`` (eight digits) written by
``accelerator.save_state`` (so every process writes its part, and the model's
state dict is taken the way its wrapper needs: under FSDP a collective call,
never a rank-0-only ``state_dict()``). It holds

- ``model.safetensors``: the full model state dict (heads, EMA teachers,
  key queues), with the run's config (JSON) and update in its metadata, so
  the weights and what built them are read without unpickling anything;
  masklab writes it (a save hook) instead of Accelerate's copy, which would
  carry no config;
- ``state.pt``: masklab's own state: the loader position (seed, epoch, step),
  the stage chain (AMT's saliency cache, EHM's progress) and the update;
- Accelerate's files: ``optimizer.bin``, ``scheduler.bin``,
  ``random_states_RANK.pkl`` (each process's Python, NumPy, torch and CUDA
  generators) and, with fp16, ``scaler.pt``.

Names and rotation are masklab's, not Accelerate's automatic naming
(``checkpoint_N`` by save count, whose ``total_limit`` deletes the oldest
*before* writing the new one and whose ``load_state()`` takes the newest
without a fallback): every process writes into ``.ckpt-UPDATE.tmp``, then the
main process renames it (:func:`~masklab.pipeline.replace_atomically`), so a
checkpoint folder is whole or absent, and only then deletes beyond ``keep``.

Nothing is unpickled unless the user trusts the file (``--trust-checkpoint``):
:func:`load_checkpoint` reads every file of the folder first, weights with
safetensors and the rest with ``torch.load(weights_only=True)`` (plus the
NumPy array types Accelerate's own loader allows for the RNG state), and
refuses what needs more. Accelerate then reads the files again, weights-only
too (the optimizer and scheduler through ``load_kwargs``, the RNG and an fp16
scaler by its default), so even a file swapped in between runs no code; only
``--trust-checkpoint`` lifts that for the optimizer and scheduler. The loader
position and the stage chain are *not* registered with
``register_for_checkpointing``: Accelerate loads registered objects with
``torch.load(weights_only=False)``, which would run code from a crafted file;
they travel in ``state.pt`` through Accelerate's save and load hooks instead,
read weights-only. A folder holding sub-folders (FSDP's sharded
``torch.distributed.checkpoint`` state, whose metadata is a plain pickle) is
refused unless trusted.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from masklab.pipeline import replace_atomically

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .config import TrainConfig

__all__ = [
    "FORMAT",
    "MODEL_FILE",
    "STATE_FILE",
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "Stateful",
    "check_resumable",
    "checkpoint_updates",
    "checkpoint_backbone",
    "fit_weights",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_path",
    "trained_config",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
FORMAT = "masklab-checkpoint-2"  # 1: state.pt held the whole training state, before Accelerate wrote it
TRUST_HINT = "pass --trust-checkpoint (config: run.trust_checkpoint=true)"
_NAME = re.compile(r"ckpt-(\d+)(\.pt)?")
_PICKLED = (".bin", ".pkl", ".pt")  # what Accelerate writes with torch.save
_RNG = re.compile(r"random_states_(\d+)\.pkl")


class Stateful(Protocol):
    """What a checkpoint saves besides the model, optimizer and scheduler (the loader, the stage chain)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class CheckpointError(ValueError):
    """A checkpoint that cannot, or may not, be read; the message names the file and says why."""


@dataclass
class Checkpoint:
    """What a checkpoint holds.

    Attributes:
        path: the checkpoint folder (or single file) it was read from.
        model: the model's full state dict.
        config: the training config that wrote it (nested dicts), ``None`` if it records none.
        update: the optimizer update it was taken at, ``None`` if it records none.
        state: the rest of the training state (``optimizer``, ``scheduler``, ``loader``,
            ``stages``, and ``rng``: each process's generators by rank); empty when only the
            weights were read.
        format: the layout it was written in (:data:`FORMAT`); ``None`` for a single-file ``.pt``.
    """

    path: Path
    model: dict[str, Any]
    config: dict[str, Any] | None = None
    update: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    format: str | None = None


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``folder`` (``ckpt-UPDATE`` folders, and older single ``ckpt-UPDATE.pt`` files), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(updates, p) for p in folder.iterdir() if (updates := checkpoint_updates(p)) is not None]
    return [p for _, p in sorted(found)]


def checkpoint_updates(path: str | os.PathLike) -> int | None:
    """The update a checkpoint was written at, from its name (``ckpt-UPDATE`` or ``ckpt-UPDATE.pt``); ``None``
    for any other name.

    Examples:
        >>> checkpoint_updates("runs/x/checkpoints/ckpt-00000930"), checkpoint_updates("model.safetensors")
        (930, None)
    """
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``folder``, ``None`` if there is none."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def remove_path(path: Path) -> None:
    """Delete a file or a folder (a checkpoint of either layout)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _safetensors_ready(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, other)``: contiguous tensors that share no memory (safetensors' rule) and the non-tensor entries."""
    tensors, other, storages = {}, {}, set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            other[name] = value
            continue
        value = value.detach().contiguous()
        storage = (value.device, value.untyped_storage().data_ptr())
        if storage in storages:
            value = value.clone()  # tied or aliased: stored twice, tied again by load_state_dict
        storages.add(storage)
        tensors[name] = value
    return tensors, other


def _disk_full(path: Path, error: OSError) -> OSError:
    kept = ", ".join(p.name for p in list_checkpoints(path.parent)) or "none"
    return OSError(
        errno.ENOSPC,
        f"the disk is full: checkpoint {path.name} could not be written to {path.parent}; nothing partial was left "
        f"and the older checkpoints are kept ({kept}). Free some space, then continue with --resume auto",
    )


class Checkpointer:
    """Saves a run's training state to ``folder/ckpt-UPDATE/`` and resumes it, through Accelerate.

    Call it on every process: :meth:`save` and :meth:`resume` wrap
    ``accelerator.save_state`` / ``load_state``, whose hooks (registered
    here) write and read ``model.safetensors`` and ``state.pt``. The model,
    optimizer and scheduler are the ones the Accelerator prepared (the
    scheduler with ``prepare_scheduler``).

    Args:
        accelerator: the run's Accelerator.
        folder: the run's checkpoint folder (made if missing).
        config: the run's config as nested dicts (stored as JSON in the weights' metadata).
        keep: how many checkpoints to keep, the newest.
        states: what ``state.pt`` holds besides the update, by name: the loader (its position)
            and the stage chain (AMT's cache, EHM's progress).
        trust: let Accelerate unpickle the optimizer and scheduler files (``--trust-checkpoint``);
            otherwise they load with ``weights_only=True``.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        folder: str | os.PathLike,
        config: dict[str, Any],
        keep: int,
        states: dict[str, Stateful],
        trust: bool = False,
    ) -> None:
        self.accelerator, self.folder, self.config, self.keep = accelerator, Path(folder), config, keep
        self.states, self.trust = states, trust
        self._update: int | None = None  # the update being saved, for the hook
        self._resuming: Checkpoint | None = None  # the checkpoint being loaded, for the hook
        loader = states.get("loader")
        self.batches_per_epoch = len(loader) if loader is not None and hasattr(loader, "__len__") else None
        accelerator.register_save_state_pre_hook(self._write_model_and_state)
        accelerator.register_load_state_pre_hook(self._read_model_and_state)

    def _write_model_and_state(self, models: list, weights: list, output_dir: str) -> None:
        if len(models) != 1:
            raise ValueError(f"a masklab checkpoint holds one model; the Accelerator prepared {len(models)}")
        model_state = self.accelerator.get_state_dict(models[0])  # collective under FSDP: every process calls it
        weights.clear()  # written below, with the config; Accelerate would write a copy without it
        if not self.accelerator.is_main_process:
            return
        tensors, extra = _safetensors_ready(model_state)
        metadata = {"format": FORMAT, "update": str(self._update), "config": json.dumps(self.config)}
        save_file(tensors, Path(output_dir) / MODEL_FILE, metadata=metadata)
        state = {name: value.state_dict() for name, value in self.states.items()}
        run = {"update": self._update, "model_extra": extra, "processes": self.accelerator.num_processes}
        torch.save({**state, **run, "batches_per_epoch": self.batches_per_epoch}, Path(output_dir) / STATE_FILE)

    def _read_model_and_state(self, models: list, input_dir: str) -> None:
        checkpoint = self._resuming
        if checkpoint is None:
            raise RuntimeError("load a masklab checkpoint with Checkpointer.resume, which reads it safely first")
        requested = checkpoint_backbone(self.config)
        for model in models:  # an FSDP model is not among them: Accelerate loads its shards itself
            unwrapped = self.accelerator.unwrap_model(model)
            fit_weights(unwrapped, checkpoint.model, checkpoint.path, checkpoint_backbone(checkpoint.config), requested)
        models.clear()
        for name, value in self.states.items():
            value.load_state_dict(checkpoint.state[name])

    def save(self, update: int) -> Path:
        """Write ``ckpt-UPDATE/`` (every process its part), then keep the newest ``keep``.

        Raises:
            OSError: the disk is full (``ENOSPC``): the message says so and names the folder; the
                older checkpoints are kept and no partial checkpoint is left. Every process raises
                when any one fails.
        """
        from .accelerator import agree

        path = self.folder / f"ckpt-{update:08d}"
        staging = self.folder / f".{path.name}.tmp"
        main = self.accelerator.is_main_process
        if main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                remove_path(staging)  # left by a killed writer
        self.accelerator.wait_for_everyone()

        def write() -> None:
            self._update = update
            try:
                self.accelerator.save_state(str(staging), safe_serialization=True)
            except OSError as error:
                raise (_disk_full(path, error) if error.errno == errno.ENOSPC else error) from error

        def publish() -> None:
            if main:
                replace_atomically(lambda tmp: os.replace(staging, tmp), path)
                for old in list_checkpoints(self.folder)[: -self.keep]:
                    remove_path(old)

        try:
            agree(self.accelerator, write)
            agree(self.accelerator, publish)
        finally:
            if main and staging.exists():
                remove_path(staging)
        return path

    def resume(self, checkpoint: Checkpoint) -> None:
        """Load ``checkpoint`` (already read and checked by :func:`load_checkpoint`, so safe) into the run.

        The weights and ``state.pt`` come from ``checkpoint`` as read; Accelerate reads the
        optimizer, scheduler and RNG files with ``weights_only=True`` (unless ``trust``).
        """
        check_resumable(checkpoint)
        self._resuming = checkpoint
        try:
            self.accelerator.load_state(str(checkpoint.path), load_kwargs={"weights_only": not self.trust})
        finally:
            self._resuming = None


def check_resumable(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint that holds weights but not a training state this masklab resumes.

    Raises:
        CheckpointError: no update recorded, an older layout, or a part missing (listed).
    """
    if checkpoint.update is None or checkpoint.format != FORMAT:
        layout = "an older masklab's" if checkpoint.format != FORMAT else "a"
        raise CheckpointError(
            f"checkpoint {checkpoint.path} is {layout} checkpoint without a training state this masklab resumes "
            f"(format {checkpoint.format or 'single file'}, update {checkpoint.update}); it can be evaluated, or "
            "fine-tuned from with model.init, not resumed"
        )
    lacking = [key for key in ("optimizer", "scheduler", "loader", "stages", "rng") if key not in checkpoint.state]
    if lacking:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds weights but not a whole training state to resume (missing: {lacking})"
        )


def _unsafe_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "unsupported" in line.lower()), lines[-1] if lines else repr(error))
    return reason.rstrip(".")


def _torch_load(file: Path, trust: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; unpickling only when ``trust``, with a warning.

    Weights-only loading is Accelerate's (:func:`accelerate.utils.load`): it also allows NumPy's
    array and dtype types, which the RNG state Accelerate saves holds, and nothing that can call code.
    """
    from accelerate.utils import load

    try:
        return load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust:
            raise CheckpointError(
                f"refused to load {file}: it is not only tensors and plain Python values ({_unsafe_reason(error)}), "
                "and unpickling it could run any code it carries. If you wrote it or trust where it came from, "
                f"{TRUST_HINT} to unpickle it"
            ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"{file} is not a complete checkpoint (truncated or corrupt?): {str(error) or 'the file is empty'}"
        ) from None
    logger.warning("unpickling %s (--trust-checkpoint): this runs any code the file carries", file)
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"{file} is not a complete checkpoint (truncated or corrupt?): {error}") from None


def _read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file} is not a complete checkpoint (truncated or corrupt?): {error}") from None


def _read_accelerate_state(folder: Path, trust: bool) -> dict[str, Any]:
    """The files Accelerate wrote into ``folder`` (optimizer, scheduler, each rank's RNG, ...), read weights-only."""
    state: dict[str, Any] = {}
    for file in sorted(folder.iterdir()):
        if file.name in (MODEL_FILE, STATE_FILE):
            continue
        if file.is_dir():
            if not trust:
                raise CheckpointError(
                    f"refused to load {file}: a folder of sharded state (torch.distributed.checkpoint), whose "
                    f"metadata is unpickled when read. If you wrote it or trust where it came from, {TRUST_HINT}"
                )
            continue
        if file.suffix not in _PICKLED:
            continue
        value = _torch_load(file, trust)
        if rng := _RNG.fullmatch(file.name):
            state.setdefault("rng", {})[int(rng.group(1))] = value
        else:
            state[file.stem] = value
    return state


def load_checkpoint(path: str | os.PathLike, trust: bool = False, training_state: bool = True) -> Checkpoint:
    """Read a checkpoint without running code from it.

    Args:
        path: a checkpoint folder (or its ``model.safetensors`` / ``state.pt``), a ``.safetensors``
            file, or a single-file ``.pt`` checkpoint of an older masklab.
        trust: unpickle a file that does not load with ``weights_only=True`` (logs a warning).
        training_state: also read the optimizer, scheduler, loader and RNG state (for a resume):
            every file of a checkpoint folder is read, so one that is truncated or crafted is
            found here, before anything is loaded into the run; without it only
            ``model.safetensors`` is opened.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: not a checkpoint, truncated or corrupt, or refused (needs unpickling and
            ``trust`` is off); the message names the file and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file() and path.name in (MODEL_FILE, STATE_FILE):
        path = path.parent
    if path.is_dir() or path.suffix == ".safetensors":
        weights_file = path / MODEL_FILE if path.is_dir() else path
        if not weights_file.is_file():
            raise CheckpointError(f"{path} is not a masklab checkpoint: it has no {MODEL_FILE}")
        model, metadata = _read_weights(weights_file)
        try:
            config = json.loads(metadata["config"]) if "config" in metadata else None
            update = int(metadata["update"]) if "update" in metadata else None
        except ValueError as error:
            raise CheckpointError(f"{weights_file} has unreadable metadata (config or update): {error}") from None
        state: dict[str, Any] = {}
        if training_state:
            state_file = path / STATE_FILE if path.is_dir() else weights_file.with_name(STATE_FILE)
            if not state_file.is_file():
                raise CheckpointError(
                    f"{path} holds weights but no training state ({STATE_FILE}): it can be evaluated or "
                    "fine-tuned from, not resumed"
                )
            state = _torch_load(state_file, trust)
            if not isinstance(state, dict):
                raise CheckpointError(f"{state_file} is not a masklab training state (found {type(state).__name__})")
            model.update(state.pop("model_extra", {}))
            if path.is_dir():
                state.update(_read_accelerate_state(path, trust))
        return Checkpoint(path, model, config, update, state, metadata.get("format"))
    data = _torch_load(path, trust)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path} is not a masklab checkpoint: expected a dict with a 'model' entry, found {found}"
        )
    rest = {k: v for k, v in data.items() if k not in ("model", "config", "update")}
    update = data.get("update")
    return Checkpoint(path, data["model"], data.get("config"), None if update is None else int(update), rest)


def trained_config(checkpoint: Checkpoint, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint was trained with, then ``overrides``.

    Raises:
        CheckpointError: the checkpoint records no config.
    """
    from omegaconf import OmegaConf

    from .config import load_config

    if checkpoint.config is None:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} records no training config, so masklab cannot tell which model "
            "to build or check it against this run; use a checkpoint written by masklab train"
        )
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "config.yaml"
        source.write_text(OmegaConf.to_yaml(OmegaConf.create(checkpoint.config)))
        return load_config(source, list(overrides))


def checkpoint_backbone(config: dict[str, Any] | None) -> str:
    """The backbone a checkpoint's config names, with its timm keyword arguments, for messages."""
    model = (config or {}).get("model") or {}
    if "backbone" not in model:
        return "unknown (the checkpoint records no config)"
    kwargs = model.get("kwargs") or {}
    return f"{model['backbone']!r}" + (f" with {kwargs}" if kwargs else "")


def _some(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def fit_weights(
    module: nn.Module,
    weights: dict[str, Any],
    source: str | os.PathLike,
    checkpoint_model: str,
    model: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Load ``weights`` into ``module`` after checking that they fit, with a short message if not.

    Args:
        module: what the weights are loaded into.
        weights: a state dict (the checkpoint's, or the part of it for ``module``).
        source: the checkpoint, for the message.
        checkpoint_model: the checkpoint's backbone, for the message (:func:`checkpoint_backbone`).
        model: the backbone this run asked for, for the message.
        optional: prefixes of ``module``'s keys the weights may lack (a classifier head trained afresh).

    Raises:
        CheckpointError: keys missing, unexpected or of another shape; the message names both
            backbones and a few keys of each kind instead of every key.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in weights and not (optional and k.startswith(optional))]
    unexpected = [k for k in weights if k not in own]
    reshaped = [
        f"{k} {tuple(weights[k].shape)} here {tuple(own[k].shape)}"
        for k in weights
        if k in own and isinstance(own[k], torch.Tensor) and tuple(weights[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or reshaped:
        kinds = (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
        problems = "; ".join(f"{len(names)} {kind}: {_some(names)}" for kind, names in kinds if names)
        raise CheckpointError(
            f"checkpoint {source} does not fit this model: it holds a {checkpoint_model} backbone, this run builds "
            f"{model} (keys {problems})"
        )
    module.load_state_dict(weights, strict=not optional)
