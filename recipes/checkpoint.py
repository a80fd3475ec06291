"""Checkpoints that cannot run code when read: weights in safetensors, the rest as tensors and plain values.

A checkpoint is a folder ``ckpt-UPDATE/`` (eight digits) holding

- ``model.safetensors``: the full model state dict (heads, EMA teachers,
  queues), with the run's config (JSON) and update in its metadata, so the
  weights and what built them are read without unpickling anything;
- ``state.pt``: the rest of the training state (optimizer, scheduler, loader
  position, stage state such as AMT's cache, RNG), only tensors and plain
  Python values, read with ``torch.load(weights_only=True)``.

It is written under a temporary name and renamed, so a checkpoint folder is
whole or absent. A file that needs unpickling (a single-file ``.pt`` written
by an older masklab holding other objects, or anything crafted) is refused
unless the caller trusts it (``--trust-checkpoint``), because unpickling runs
any code the file carries.
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
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from masklab.pipeline import replace_atomically

__all__ = [
    "MODEL_FILE",
    "STATE_FILE",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_backbone",
    "fit_weights",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_path",
    "save_checkpoint",
    "trained_config",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
FORMAT = "masklab-checkpoint-1"
TRUST_HINT = "pass --trust-checkpoint (config: run.trust_checkpoint=true)"
_NAME = re.compile(r"ckpt-(\d+)(\.pt)?")


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
            ``stages``, ``rng``); empty when only the weights were read.
    """

    path: Path
    model: dict[str, Any]
    config: dict[str, Any] | None = None
    update: int | None = None
    state: dict[str, Any] = field(default_factory=dict)


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``folder`` (``ckpt-UPDATE`` folders, and older single ``ckpt-UPDATE.pt`` files), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


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


def save_checkpoint(
    folder: str | os.PathLike,
    update: int,
    model_state: dict[str, Any],
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``folder/ckpt-UPDATE/`` (``model.safetensors`` and ``state.pt``) atomically, keep the last ``keep``.

    Args:
        folder: the run's checkpoint folder (made if missing).
        update: the optimizer update; names the checkpoint.
        model_state: the model's state dict.
        state: the rest of the training state: tensors and plain Python values only.
        config: the run's config as nested dicts (stored as JSON in the weights' metadata).
        keep: how many checkpoints to keep, the newest.

    Returns:
        The checkpoint folder.

    Raises:
        OSError: the disk is full (``ENOSPC``): the message says so and names the folder; the
            older checkpoints are kept and no partial checkpoint is left.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{update:08d}"
    tensors, extra = _safetensors_ready(model_state)
    metadata = {"format": FORMAT, "update": str(update), "config": json.dumps(config)}

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file(tensors, tmp / MODEL_FILE, metadata=metadata)
        torch.save({**state, "update": update, "model_extra": extra}, tmp / STATE_FILE)

    try:
        replace_atomically(write, path)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        kept = ", ".join(p.name for p in list_checkpoints(folder)) or "none"
        raise OSError(
            errno.ENOSPC,
            f"the disk is full: checkpoint {path.name} could not be written to {folder}; nothing partial was left "
            f"and the older checkpoints are kept ({kept}). Free some space, then continue with --resume auto",
        ) from error
    for old in list_checkpoints(folder)[:-keep]:
        remove_path(old)
    return path


def _unsafe_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "unsupported" in line.lower()), lines[-1] if lines else repr(error))
    return reason.rstrip(".")


def _torch_load(file: Path, trust: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; unpickling only when ``trust``, with a warning."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
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


def load_checkpoint(path: str | os.PathLike, trust: bool = False, training_state: bool = True) -> Checkpoint:
    """Read a checkpoint without running code from it.

    Args:
        path: a checkpoint folder (or its ``model.safetensors`` / ``state.pt``), a ``.safetensors``
            file, or a single-file ``.pt`` checkpoint of an older masklab.
        trust: unpickle a ``.pt`` that does not load with ``weights_only=True`` (logs a warning).
        training_state: also read the optimizer, scheduler, loader and RNG state (for a resume);
            without it a checkpoint folder's ``state.pt`` is not opened at all.

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
        return Checkpoint(path, model, config, update, state)
    data = _torch_load(path, trust)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path} is not a masklab checkpoint: expected a dict with a 'model' entry, found {found}"
        )
    rest = {k: v for k, v in data.items() if k not in ("model", "config", "update")}
    update = data.get("update")
    return Checkpoint(path, data["model"], data.get("config"), None if update is None else int(update), rest)


def trained_config(checkpoint: Checkpoint, overrides: list[str] | tuple[str, ...] = ()):
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
