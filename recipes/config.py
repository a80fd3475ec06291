"""Typed training configs: dataclass schemas, YAML files and dotted overrides (OmegaConf)."""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from masklab.objectives import OBJECTIVES, ObjectiveOptions, SupervisedOptions
from masklab.transforms import MASKS, MaskOptions

__all__ = [
    "CONFIG_DIR",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "check_config",
    "load_config",
    "save_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TASKS = ("pretrain", "supervised", "finetune", "linear", "knn")
DEFAULT_MASK, DEFAULT_OBJECTIVE = "random", "mae"

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where images come from and how the loader cuts them."""

    train: str = "builtin:shapes"  # a .beton file, or builtin:shapes / builtin:digits
    test: str = "builtin:shapes:test"
    resolution: int = 32
    batch_size: int = 128
    num_workers: int = 2
    # The crop's area range (null: a centred square); MAE's is [0.2, 1.0], ours is narrower for 32 px images.
    scale: list[float] | None = field(default_factory=lambda: [0.35, 1.0])
    flip_p: float = 0.5
    length: int = 4000  # images of builtin:shapes (train); the test split has a quarter
    # builtin: sources generated once per process into memory (InMemoryImages, by num_workers processes), then
    # gathered on the device per batch: the same batches, no per-epoch generation (the study's GPU preset).
    in_memory: bool = False
    views: str | None = None  # a Views preset (mocov2, byol, ...): two augmented views for siamese objectives
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])


@dataclass
class ModelConfig:
    """A timm backbone by name (never pretrained: no downloads)."""

    backbone: str = "vit_tiny_patch16_224"
    patch_size: int | None = 4  # ViTs only; None keeps the model's
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (e.g. depth: 6)
    init: str | None = None  # a masklab checkpoint whose backbone initialises this one (finetune, linear)
    small_stem: bool = False  # ResNets: 3x3 stride-1 stem without max-pool, for 32 px images
    sync_bn: bool = True  # convert batch norm to SyncBatchNorm when training on several GPUs
    grad_checkpointing: bool = False  # recompute block activations in the backward pass (less memory, more time)
    compile: bool = False  # torch.compile the backbone's blocks (ViT) or the whole network (CNN, classifier)
    channels_last: bool = False  # CNNs: channels-last weights (faster convolutions on GPUs with tensor cores)


@dataclass
class OptimConfig:
    """The optimizer (any of timm's, by name) and its learning-rate schedule.

    ``lr`` and ``base_lr`` are two ways to give the peak learning rate; a layer (the recipe, then the
    overrides) that sets one clears the other, so ``optim.base_lr=1.5e-4`` on the command line replaces
    the recipe's ``lr``.
    """

    # timm's names: adamw, momentum (SGD with classical momentum), sgd (timm: SGD with *Nesterov* momentum),
    # lars, lamb, ...
    name: str = "adamw"
    lr: float | None = 1.5e-3  # the peak learning rate
    base_lr: float | None = (
        None  # or MAE's base rate: peak lr = base_lr * global batch / 256 (global: over ranks and accumulation)
    )
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    decay_bias_and_norm: bool = False  # weight decay on biases and norm weights too (all 1-D parameters), as MoCo
    betas: list[float] | None = None  # Adam-family / LAMB betas, e.g. [0.9, 0.95]; null: the optimizer's default
    momentum: float = 0.9
    layer_decay: float | None = None  # layer-wise lr decay (fine-tuning)
    warmup_epochs: float = 1.0
    grad_accum: int = 1
    clip_grad: float | None = 3.0  # gradient-norm clip (null: none); MAE and MoCo clip none, SimMIM at 5.0
    mixed_precision: str = "auto"  # auto (bf16 where the device supports it) | no | bf16 | fp16


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_epochs: int = 100
    linear_lr: float = 0.01
    at_end: bool = True  # kNN of the trained encoder after training
    every_epochs: int = 0  # kNN monitor every N epochs during pretraining (metrics.csv's knn column); 0: off
    data: str | None = None  # labelled images for the kNN bank and the probe's training (default: data.train)


@dataclass
class RunConfig:
    out: str = "runs/train"
    seed: int = 0
    epochs: int = 10
    max_steps: int | None = None  # end the run (and its lr schedule) after this many optimizer updates
    stop_at: int | None = None  # stop this process after N updates with a checkpoint; the schedule still spans the run
    device: str = "auto"  # auto | cpu | cuda | ...
    log_every: int = 10
    ckpt_every: int = 200  # updates between checkpoints (and one at the end)
    keep: int = 3  # checkpoints kept
    resume: str | None = None  # a checkpoint path, or "auto" for the latest in `out`
    overwrite: bool = False  # a fresh run into an `out` holding a previous run's outputs deletes them first
    trust_checkpoint: bool = False  # unpickle checkpoints (resume, model.init) that need it: runs any code they carry
    progress: bool = True
    record_indices: bool = False  # keep the dataset indices each rank trained on (debugging, tests)
    log_with: list[str] = field(default_factory=lambda: ["auto"])  # Accelerate trackers, all, none, or auto
    skip_nonfinite: int = 0  # skip up to K updates whose loss is NaN/inf (checked every update); 0: stop at the first


@dataclass
class TrainConfig:
    """A whole run. Unknown or mistyped keys are errors that name the key.

    ``mask`` and ``objective`` are the options dataclasses of the entries their ``name`` selects
    (:func:`load_config` picks them), so each section holds that entry's keys only.
    """

    task: str = "pretrain"  # pretrain | supervised | finetune | linear | knn
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The mask stage's and the objective's options, by their names (masklab.transforms.MASKS,
    # masklab.objectives.OBJECTIVES); tasks that train a classifier read SupervisedOptions.
    mask: MaskOptions = field(default_factory=lambda: MASKS[DEFAULT_MASK].section())
    objective: ObjectiveOptions = field(default_factory=lambda: OBJECTIVES[DEFAULT_OBJECTIVE].section())
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _resolve(path: str | os.PathLike) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    named = CONFIG_DIR / f"{path}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config {str(path)!r}: not a file, nor one of the recipes {known}")


def load_config(source: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Schema defaults, then a YAML file (a path or a recipe name such as ``mae``), then ``key=value`` overrides.

    Raises:
        ValueError: an unknown key (named, with its place), a value of the wrong type, or a bad task.
    """
    layers = []
    if source is not None:
        layers.append(OmegaConf.load(_resolve(source)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    layers.append(_from_dotlist(list(overrides)))
    _one_peak_lr(layers)
    config = OmegaConf.structured(_schema(layers))
    try:
        for layer in layers:
            config = OmegaConf.merge(config, layer)
    except (ConfigKeyError, ConfigAttributeError) as error:
        key = getattr(error, "full_key", None) or str(error)
        hint = str(error).splitlines()[0]
        raise ValueError(f"unknown config key {key!r}: {hint}") from None
    except ValidationError as error:
        hint = str(error).splitlines()[0]
        raise ValueError(f"bad value for config key {getattr(error, 'full_key', '?')!r}: {hint}") from None
    result: TrainConfig = OmegaConf.to_object(config)
    check_config(result)
    return result


def _one_peak_lr(layers: list[DictConfig]) -> None:
    """A layer that sets ``optim.lr`` clears ``optim.base_lr`` and the other way round; one that sets both is an error."""
    for layer in layers:
        optim = layer.get("optim") if isinstance(layer, DictConfig) else None
        if not isinstance(optim, DictConfig):
            continue
        lr, base_lr = optim.get("lr"), optim.get("base_lr")
        if lr is not None and base_lr is not None:
            raise ValueError(
                f"optim.lr={lr} and optim.base_lr={base_lr} are exclusive: give the peak lr or the base lr, not both"
            )
        if lr is not None:
            optim.base_lr = None
        elif base_lr is not None:
            optim.lr = None


def _chosen(layers: list[DictConfig], key: str, default: str) -> Any:
    """The last value the layers give ``key`` (dotted), or ``default``."""
    value = default
    for layer in layers:
        value = OmegaConf.select(layer, key, default=value, throw_on_missing=False)
    return value


def _entry(registry, layers: list[DictConfig], key: str, default: str):
    try:
        return registry[str(_chosen(layers, key, default))]
    except ValueError as error:
        raise ValueError(f"bad value for config key {key!r}: {error}") from None


def _schema(layers: list[DictConfig]) -> TrainConfig:
    """The defaults, with the ``mask`` and ``objective`` sections of the entries the layers name.

    Keys of a section that another entry of the same kind takes are dropped from the layers (a
    recipe's ``objective.decoder_dim`` means nothing once ``objective.name=simmim``); a key no entry
    takes is an error naming it and the close ones.
    """
    mask = _entry(MASKS, layers, "mask.name", DEFAULT_MASK).section()
    if _chosen(layers, "task", "pretrain") == "pretrain":
        objective = _entry(OBJECTIVES, layers, "objective.name", DEFAULT_OBJECTIVE).section()
    else:
        objective = SupervisedOptions()
    _fit_section(layers, "mask", mask, [entry.options for entry in MASKS])
    _fit_section(layers, "objective", objective, [entry.options for entry in OBJECTIVES] + [SupervisedOptions])
    return TrainConfig(mask=mask, objective=objective)


def _fit_section(layers: list[DictConfig], section: str, chosen: Any, every: list[type]) -> None:
    keep = {f.name for f in fields(chosen)}
    elsewhere = {f.name for options in every for f in fields(options)} - keep
    for layer in layers:
        node = layer.get(section) if isinstance(layer, DictConfig) else None
        if not isinstance(node, DictConfig):
            continue
        for key in [str(k) for k in node.keys()]:
            if key in keep:
                continue
            if key in elsewhere:
                logger.info("%s.%s is not an option of the %r %s: ignored", section, key, chosen.name, section)
                del node[key]
                continue
            close = difflib.get_close_matches(key, sorted(keep | elsewhere), n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"unknown config key '{section}.{key}': the {chosen.name!r} {section} takes "
                f"{', '.join(sorted(keep))}, and no other {section} takes it.{hint}"
            )


def _from_dotlist(overrides: list[str]):
    try:
        return OmegaConf.from_dotlist(overrides)
    except yaml.YAMLError:
        for override in overrides:
            try:
                OmegaConf.from_dotlist([override])
            except yaml.YAMLError as error:
                problem = getattr(error, "problem", None) or str(error).splitlines()[0]
                key, value = override.split("=", 1)
                spaced = re.sub(r":(?=\S)", ": ", value)
                hint = f'; YAML needs a space after each colon: {key}="{spaced}"' if spaced != value else ""
                raise ValueError(f"override {override!r} is not valid YAML ({problem}){hint}") from None
        raise


AT_LEAST_ONE = (
    "data.resolution",
    "data.batch_size",
    "optim.grad_accum",
    "eval.knn_k",
    "eval.linear_epochs",
    "run.epochs",
    "run.max_steps",
    "run.stop_at",
    "run.log_every",
    "run.ckpt_every",
    "run.keep",
    "model.patch_size",
)
"""Integer keys that must be at least 1 (those that may be null are checked only when set)."""


def _value(config: TrainConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def check_config(config: TrainConfig) -> None:
    """Raise ``ValueError`` naming the key and the value of the first setting that cannot work.

    Checks what the config alone decides: the task, counts that must be at
    least 1, the mask ratio of a pretraining run, and ``model.kwargs`` that
    YAML read differently from what was meant (``{depth:2}`` is the key
    ``'depth:2'`` with no value). What needs the model (the backbone name,
    the kwargs it takes, the patch grid) is checked when it is built.
    """
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
    for key in AT_LEAST_ONE:
        value = _value(config, key)
        if value is not None and value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    mask, ratio = config.mask, getattr(config.mask, "ratio", None)
    if config.task == "pretrain" and ratio is not None and not 0 < ratio < 1:
        raise ValueError(
            f"mask.ratio must lie strictly between 0 and 1 for the {mask.name!r} mask, got mask.ratio={ratio}"
            + (" (it would mask nothing)" if ratio == 0 else "")
        )
    if config.optim.mixed_precision in ("False", "false"):  # YAML reads a bare `no` as false
        config.optim.mixed_precision = "no"
    if config.optim.mixed_precision not in PRECISIONS:
        raise ValueError(f"optim.mixed_precision must be one of {PRECISIONS}, got {config.optim.mixed_precision!r}")
    if config.eval.every_epochs < 0:
        raise ValueError(f"eval.every_epochs must be 0 (off) or more, got {config.eval.every_epochs}")
    _check_trackers(list(config.run.log_with))
    if config.run.skip_nonfinite < 0:
        raise ValueError(f"run.skip_nonfinite must be 0 or more (updates to skip), got {config.run.skip_nonfinite}")
    _check_model_kwargs(config.model.kwargs)
    _check_optim(config.optim)


def _check_optim(optim: OptimConfig) -> None:
    from timm.optim import get_optimizer_info, list_optimizers

    if (optim.lr is None) == (optim.base_lr is None):
        given = "both" if optim.lr is not None else "neither"
        raise ValueError(
            f"give exactly one of optim.lr (the peak lr) and optim.base_lr (the base lr, scaled by global batch / 256); "
            f"got {given}: optim.lr={optim.lr}, optim.base_lr={optim.base_lr}"
        )
    for key in ("lr", "base_lr"):
        value = getattr(optim, key)
        if value is not None and value <= 0:
            raise ValueError(f"optim.{key} must be positive, got {value}")
    name = optim.name.lower().split("_")[-1]  # timm reads "lookahead_adamw" as adamw in a Lookahead
    known = list_optimizers()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = (
            f"; did you mean {' or '.join(map(repr, close))}?" if close else "; timm.optim.list_optimizers() lists them"
        )
        raise ValueError(f"optim.name {optim.name!r} is not a timm optimizer{hint}")
    if optim.betas is None:
        return
    info = get_optimizer_info(name)
    if not info.has_betas:
        raise ValueError(
            f"optim.betas={list(optim.betas)} is for optimizers with betas (adamw, lamb, ...); "
            f"{optim.name!r} takes none: set optim.betas=null"
        )
    if len(optim.betas) != info.num_betas or not all(0 <= b < 1 for b in optim.betas):
        raise ValueError(f"optim.betas must be {info.num_betas} numbers in [0, 1), got {list(optim.betas)}")


PRECISIONS = ("auto", "no", "bf16", "fp16", "fp8")
"""``optim.mixed_precision`` values: ``auto`` (bf16 where the device supports it) or Accelerate's."""

TRACKER_CHOICES = ("auto", "all", "none")
"""``run.log_with`` words besides Accelerate's tracker names: ``auto`` (TensorBoard if installed), every
installed tracker, none (``metrics.csv`` only)."""


def _check_trackers(names: list[str]) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    known = (*TRACKER_CHOICES, *LOGGER_TYPE_TO_CLASS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"run.log_with names unknown trackers {unknown}; choose from {list(known)}")
    if len(names) > 1 and set(names) & set(TRACKER_CHOICES):
        raise ValueError(f"run.log_with: {list(TRACKER_CHOICES)} stand alone, got {names}")


SET_BY_MASKLAB = {
    "img_size": "data.resolution",
    "patch_size": "model.patch_size",
    "small_stem": "model.small_stem",
    "num_classes": "the task (the data's classes for a classifier, none for an encoder)",
    "features_only": "the backbone family (CNN encoders are built features_only)",
    "pretrained": "model.init (masklab never downloads weights)",
}
"""``model.kwargs`` keys masklab passes to timm itself -> where they come from."""


def _check_model_kwargs(kwargs: dict[str, Any]) -> None:
    for key in kwargs:
        if key in SET_BY_MASKLAB:
            raise ValueError(
                f"model.kwargs key {key!r} is one masklab sets itself, from {SET_BY_MASKLAB[key]}; leave it out"
            )
    unclear = [key for key, value in kwargs.items() if value is None or ":" in str(key)]
    if not unclear:
        return
    meant: dict[str, Any] = {}
    for key, value in kwargs.items():
        if ":" in str(key) and value is None:
            key, value = (part.strip() for part in str(key).split(":", 1))
        meant[key] = value
    inner = ", ".join(f"{key}: {'VALUE' if value is None else value}" for key, value in meant.items())
    right = f'model.kwargs="{{{inner}}}"'
    key = unclear[0]
    if ":" in str(key):
        raise ValueError(f"model.kwargs key {key!r} has no value: YAML needs a space after the colon; write {right}")
    raise ValueError(f"model.kwargs key {key!r} has no value (timm would ignore it); give it one, as in {right}")


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML (what :func:`load_config` reads back)."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """``config`` as plain nested dicts and lists (what ``config.yaml`` and checkpoints record)."""
    return OmegaConf.to_container(OmegaConf.structured(config))
