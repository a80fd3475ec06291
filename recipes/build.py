"""Turn a TrainConfig into loaders, a model and an optimizer."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from masklab.objectives import (
    OBJECTIVES,
    Supervised,
    ViTBackbone,
    backbone_family,
    build_backbone,
    check_compatible,
    create_timm,
)
from masklab.pipeline import DatasetLoader, Loader, builtin_dataset
from masklab.transforms import MASKS, BlockMask, MaskContext, MixMask, Normalize, Views, mask_count

from .config import TrainConfig

__all__ = [
    "build_encoder",
    "build_loader",
    "build_model",
    "build_optimizer",
    "check_backbone",
    "check_mask_grid",
    "checkpoint_dir",
    "encoder_of",
    "family_of",
    "num_classes_of",
    "patch_size_of",
    "peak_lr",
    "sync_batchnorm",
]

logger = logging.getLogger(__name__)


def _builtin(spec: str, cfg: TrainConfig):
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "builtin":
        raise ValueError(f"data source {spec!r} must be a .beton path or builtin:NAME[:SPLIT]")
    name, split = parts[1], parts[2] if len(parts) == 3 else "train"
    kwargs = {"size": cfg.data.resolution, "split": split, "seed": 0}
    if name.startswith("shapes"):
        kwargs["length"] = cfg.data.length if split == "train" else max(1, cfg.data.length // 4)
    if not cfg.data.in_memory:
        return builtin_dataset(name, **kwargs)
    return _in_memory(name, tuple(sorted(kwargs.items())), cfg.data.num_workers)


@functools.lru_cache(maxsize=4)
def _in_memory(name: str, drawn: tuple, num_workers: int):
    """A built-in source generated once into memory, kept for the process's next runs (the study's share
    them: train, test, the fine-tuning subset)."""
    from masklab.pipeline import InMemoryImages

    return InMemoryImages.read(builtin_dataset(name, **dict(drawn)), num_workers=num_workers)


def num_classes_of(spec: str) -> int:
    """The number of classes of a ``builtin:NAME`` or ``.beton`` data spec (from its info file)."""
    if spec.startswith("builtin:"):
        from masklab.pipeline import BUILTIN

        name = spec.split(":")[1]
        if name not in BUILTIN:
            raise ValueError(f"unknown built-in dataset {name!r} in {spec!r}; choose one of {sorted(BUILTIN)}")
        return len(BUILTIN[name].classes)
    from masklab.pipeline import read_info

    info = read_info(spec)
    if not info.labelled:
        raise ValueError(f"{spec} has {info.unlabelled} unlabelled images (label -1): a classifier needs labels")
    return info.num_classes


def check_evaluation_labels(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` before training when the evaluation the run asks for has unlabelled images.

    kNN (``eval.at_end``, ``eval.every_epochs``) needs labelled images for its memory bank
    (``eval.data``, default ``data.train``) and its queries (``data.test``).
    """
    if cfg.task != "pretrain" or not (cfg.eval.at_end or cfg.eval.every_epochs):
        return
    from masklab.pipeline import read_info

    for key, spec in (("eval.data", cfg.eval.data or cfg.data.train), ("data.test", cfg.data.test)):
        if spec.endswith(".beton") and Path(spec).exists() and not read_info(spec).labelled:
            raise ValueError(
                f"{key}={spec} has unlabelled images, and the kNN evaluation (eval.at_end, eval.every_epochs) "
                "needs labels: give labelled images as eval.data (the kNN memory bank) and data.test, or set "
                "eval.at_end=false eval.every_epochs=0"
            )


def patch_size_of(cfg: TrainConfig, family: str) -> int:
    """The mask grid's cell: the ViT's patch, or 1/8 of the image side for CNNs."""
    if family == "vit":
        return int(cfg.model.patch_size or 16)
    return max(1, cfg.data.resolution // 8)


def check_mask_grid(cfg: TrainConfig, family: str) -> None:
    """Raise ``ValueError`` unless the mask's cells tile ``data.resolution`` and ``mask.ratio`` masks one.

    What the first batch would otherwise fail on, checked before the loader starts.
    """
    m, size = cfg.mask, cfg.data.resolution
    entry = MASKS[m.name]
    patch = patch_size_of(cfg, family)
    vit = f"model.patch_size={patch}"
    cells = {vit if family == "vit" else f"the CNN mask cell {patch} (data.resolution // 8)": patch}
    masking = cfg.task == "pretrain" and entry.emits == "patch"  # stages that cut the image into the patch grid
    coarse = getattr(m, entry.coarse_cell) if masking and entry.coarse_cell else None
    if coarse is not None:  # None: the stage counts single patches (AMT on MAE)
        cells[f"mask.{entry.coarse_cell}={coarse}"] = coarse
    for what, cell in cells.items():
        if size % cell:
            raise ValueError(
                f"data.resolution={size} is not divisible by {what}: the mask grid needs whole cells; "
                f"choose a resolution that is a multiple of {cell}"
            )
    ratio = getattr(m, "ratio", None)
    if masking and ratio is not None:
        count = (size // max(cells.values())) ** 2  # the ratio counts cells of the coarsest grid
        if mask_count(count, ratio) == 0:
            raise ValueError(
                f"mask.ratio={ratio} masks round({ratio} * {count}) = 0 of the {count} cells of a "
                f"{size} px image; raise mask.ratio above {0.5 / count:.3g}"
            )


def mask_stages(cfg: TrainConfig, family: str, num_samples: int = 0) -> list[nn.Module]:
    """The loader's mask stages: the registered stage ``mask.name`` selects, built from its options
    (pretraining), or MixMask and block erasing as augmentation (supervised)."""
    patch = patch_size_of(cfg, family)
    m = cfg.mask
    if cfg.task == "supervised":
        stages: list[nn.Module] = []
        if cfg.objective.mixmask:
            stages.append(MixMask(grid=cfg.objective.mixmask_grid))
        if cfg.objective.erase_ratio > 0:
            check_mask_grid(cfg, family)
            stages.append(BlockMask(cfg.objective.erase_ratio, patch_size=patch))
        return stages
    if cfg.task != "pretrain":
        return []
    entry = MASKS[m.name]
    if entry.emits == "patch":
        check_mask_grid(cfg, family)
    stage = entry.build(m, MaskContext(patch, cfg.data.resolution, num_samples))
    return [] if stage is None else [stage]


def build_loader(
    cfg: TrainConfig,
    split: str,
    device: torch.device,
    family: str = "vit",
    distributed: bool = False,
    train: bool = True,
) -> Loader | DatasetLoader:
    """The train loader (augmented, masked, shuffled) or an evaluation loader (centred, sequential)."""
    if split not in ("train", "test", "eval"):
        raise ValueError(f"split must be train, test or eval (the kNN memory bank), got {split!r}")
    spec = {"train": cfg.data.train, "test": cfg.data.test, "eval": cfg.eval.data or cfg.data.train}[split]
    source = spec if spec.endswith(".beton") else _builtin(spec, cfg)
    # Views cut from [0, 1] images, so they come before Normalize (which normalises the views too).
    views = [Views(2, cfg.data.views)] if train and cfg.data.views else []
    stages: list[nn.Module] = [*views, Normalize(cfg.data.mean, cfg.data.std)]
    common = {
        "batch_size": cfg.data.batch_size,
        "resolution": cfg.data.resolution,
        "device": device,
        "seed": cfg.run.seed,
    }
    if train:
        stages += mask_stages(cfg, family, _count(source))
        scale = tuple(cfg.data.scale) if cfg.data.scale else None
        common.update(scale=scale, flip_p=cfg.data.flip_p, distributed=distributed)
    else:
        # Evaluation and AMT's refresh pass: whole images, in order (sharded when asked).
        common.update(scale=None, flip_p=0.0, order="sequential", drop_last=False, distributed=distributed)
    if isinstance(source, str):
        return Loader(source, stages=stages, num_workers=cfg.data.num_workers, **common)
    return DatasetLoader(source, stages=stages, num_workers=cfg.data.num_workers, **common)


def _count(source) -> int:
    if isinstance(source, str):
        from masklab.pipeline import read_info

        return read_info(source).count
    return len(source)


def check_backbone(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` if ``model.backbone`` is no timm model, naming it and the closest timm names."""
    import timm

    name = cfg.model.backbone
    if ":" in name or timm.is_model(name):  # hf-hub: and local-dir: sources are timm's to resolve
        return
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else "; timm.list_models() lists them"
    raise ValueError(f"model.backbone {name!r} is not a timm model{hint}")


_UNEXPECTED = re.compile(r"([\w.]+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


def _constructor(name: str, qualname: str) -> type | None:
    """The class called ``qualname`` in the module of timm's ``name`` entrypoint, or in any timm model module."""
    from timm.models import model_entrypoint

    modules = [sys.modules[model_entrypoint(name).__module__]] if ":" not in name else []
    modules += [m for key, m in list(sys.modules.items()) if key.startswith("timm.models.") and m is not None]
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and value.__qualname__ == qualname:
                return value
    return None


def _kwargs_error(cfg: TrainConfig, error: TypeError) -> str:
    """What a ``TypeError`` from timm's constructor means for ``model.kwargs``: the unknown key, close
    matches among the constructor's arguments, and those arguments."""
    name, given = cfg.model.backbone, cfg.model.kwargs
    found = _UNEXPECTED.search(str(error))
    cls = _constructor(name, found.group(1)) if found and found.group(2) in given else None
    if cls is None:
        return f"timm could not build {name!r} with model.kwargs={given}: {error}"
    key = found.group(2)
    params = inspect.signature(cls.__init__).parameters.values()
    accepted = sorted(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    accepted = [a for a in accepted if a != "self"]
    close = difflib.get_close_matches(key, accepted, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    return (
        f"model.kwargs key {key!r} is not an argument of {name} (timm's {cls.__qualname__}); {hint}"
        f"it takes: {', '.join(accepted)}"
    )


@contextlib.contextmanager
def _timm_errors(cfg: TrainConfig) -> Iterator[None]:
    """Check ``model.backbone``, and turn timm's ``TypeError`` about ``model.kwargs`` into a ``ValueError``."""
    check_backbone(cfg)
    try:
        yield
    except TypeError as error:
        raise ValueError(_kwargs_error(cfg, error)) from error


def build_encoder(cfg: TrainConfig) -> ViTBackbone | nn.Module:
    """The backbone of ``cfg.model`` (timm, randomly initialised), wrapped as masklab's ViT or CNN backbone."""
    with _timm_errors(cfg):
        return build_backbone(
            cfg.model.backbone,
            img_size=cfg.data.resolution,
            patch_size=cfg.model.patch_size,
            small_stem=cfg.model.small_stem,
            **cfg.model.kwargs,
        )


def _load_backbone_weights(model: nn.Module, cfg: TrainConfig, prefix: str = "backbone.model.") -> None:
    """Initialise the timm classifier ``model`` from ``cfg.model.init``'s backbone; its classifier starts afresh.

    ``cfg.model.init`` is a masklab checkpoint or an exported timm model folder (``masklab export``).
    """
    from .checkpoint import MODEL_FILE, Checkpoint, checkpoint_backbone, fit_weights, load_checkpoint
    from .export import read_export

    exported = read_export(cfg.model.init)
    if exported is not None:  # a timm model folder (masklab export): plain timm keys, no prefix
        from safetensors.torch import load_file

        source = {"model": {"backbone": exported["architecture"], "kwargs": exported.get("model_args")}}
        checkpoint = Checkpoint(Path(cfg.model.init), load_file(str(Path(cfg.model.init) / MODEL_FILE)), source)
        prefix = ""
    else:
        checkpoint = load_checkpoint(cfg.model.init, trust=cfg.run.trust_checkpoint, training_state=False)
    weights = {k[len(prefix) :]: v for k, v in checkpoint.model.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"checkpoint {cfg.model.init} holds no backbone weights (no keys starting with {prefix!r})")
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))
    requested = checkpoint_backbone({"model": {"backbone": cfg.model.backbone, "kwargs": cfg.model.kwargs}})
    fit_weights(model, weights, cfg.model.init, checkpoint_backbone(checkpoint.config), requested, optional=heads)
    logger.info("initialised the backbone from %s (%d tensors; %s trained afresh)", cfg.model.init, len(weights), heads)


def speed_options(cfg: TrainConfig, model: nn.Module, adapter: bool) -> None:
    """Apply ``model.grad_checkpointing``, ``model.channels_last`` and ``model.compile`` to a timm model, in place.

    ``adapter``: ``model`` is the timm ViT inside a :class:`ViTBackbone`, which runs its blocks itself:
    checkpointing is honoured by the adapter's block loop and ``compile`` compiles each block
    (the ViT's own ``forward`` is not what the objectives call). Otherwise ``model`` runs as a whole
    and is compiled whole. ``nn.Module.compile`` compiles in place, so checkpoints keep their keys.

    Raises:
        ValueError: ``channels_last`` for a model without convolutions worth it (a ViT), or grad
            checkpointing on a timm model that does not support it.
    """
    m = cfg.model
    if m.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, NotImplementedError, AssertionError) as error:
            raise ValueError(
                f"model.grad_checkpointing: {cfg.model.backbone} does not support it in timm ({error})"
            ) from None
    if m.channels_last:
        if hasattr(model, "patch_embed"):
            raise ValueError(f"model.channels_last is for CNNs; {cfg.model.backbone} is a ViT")
        model.to(memory_format=torch.channels_last)
    if m.compile:
        for module in model.blocks if adapter else [model]:
            module.compile()


def build_model(cfg: TrainConfig) -> nn.Module:
    """The trainable module: an objective holding its backbone (pretrain) or a classifier."""
    if cfg.task == "pretrain":
        entry = OBJECTIVES[cfg.objective.name]
        backbone = build_encoder(cfg)
        check_compatible(entry.name, family=backbone_family(backbone), mask=cfg.mask.name)
        if entry.views > 1 and not cfg.data.views:
            views = {2: "two"}.get(entry.views, entry.views)
            raise ValueError(
                f"objective {entry.name!r} needs {views} views: set data.views to a Views preset (mocov2, byol, ...)"
            )
        objective = entry.build(backbone, cfg.objective, cfg.mask)
        # After the objective is built: an EMA teacher copies the backbone as it was (uncompiled).
        speed_options(cfg, backbone.model, adapter=backbone_family(backbone) == "vit")
        return objective
    if cfg.task in ("supervised", "finetune"):
        classes = num_classes_of(cfg.data.train)
        with _timm_errors(cfg):
            model = create_timm(
                cfg.model.backbone,
                cfg.data.resolution,
                cfg.model.patch_size,
                small_stem=cfg.model.small_stem,
                num_classes=classes,
                **cfg.model.kwargs,
            )
        if cfg.model.init:
            _load_backbone_weights(model, cfg)
        speed_options(cfg, model, adapter=False)
        return Supervised(model, classes, cfg.objective.label_smoothing)
    raise ValueError(f"task {cfg.task!r} does not train a model")


def sync_batchnorm(cfg: TrainConfig, model: nn.Module, device: torch.device, processes: int) -> nn.Module:
    """``SyncBatchNorm`` in place of batch norm when several processes train on GPUs (``model.sync_bn``).

    Our choice over MoCo's shuffle-BN: with SyncBN every batch-norm layer
    (online, momentum encoder and heads) normalises over the global batch.
    PyTorch's SyncBatchNorm runs on GPUs only, so CPU ranks keep per-rank BN.
    """
    if not cfg.model.sync_bn or processes < 2 or device.type == "cpu":
        return model
    logger.info("converting batch norm to SyncBatchNorm over %d processes", processes)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def peak_lr(cfg: TrainConfig, processes: int = 1) -> float:
    """The schedule's peak learning rate: ``optim.lr``, or MAE's rule ``optim.base_lr * global batch / 256``.

    The global batch is ``data.batch_size`` (per process) times ``optim.grad_accum`` times ``processes``,
    as MAE's ``main_pretrain.py`` counts it.
    """
    o = cfg.optim
    if o.base_lr is None:
        return float(o.lr)
    return o.base_lr * cfg.data.batch_size * o.grad_accum * processes / 256


def build_optimizer(cfg: TrainConfig, model: nn.Module, processes: int = 1) -> torch.optim.Optimizer:
    """A timm optimizer at :func:`peak_lr` over the parameters that require gradients.

    Biases and norm weights (all 1-D parameters) get no weight decay unless
    ``optim.decay_bias_and_norm`` (timm's ``filter_bias_and_bn``); layer-wise
    lr decay groups the timm model's blocks (fine-tuning). Frozen parameters
    (MAE's fixed position table, EMA teachers) are in no group.

    Args:
        cfg: the run's config (``optim`` and, for ``optim.base_lr``, ``data.batch_size``).
        model: what :func:`build_model` returned.
        processes: the number of training processes (for ``optim.base_lr``).
    """
    from timm.optim import create_optimizer_v2, get_optimizer_info

    o = cfg.optim
    target = model.model if isinstance(model, Supervised) else model
    info = get_optimizer_info(o.name.lower().split("_")[-1])
    kwargs = {}
    if info.has_momentum:
        kwargs["momentum"] = o.momentum
    if o.betas is not None:
        kwargs["betas"] = tuple(o.betas)
    return create_optimizer_v2(
        target,
        opt=o.name,
        lr=peak_lr(cfg, processes),
        weight_decay=o.weight_decay,
        filter_bias_and_bn=not o.decay_bias_and_norm,
        layer_decay=o.layer_decay,
        **kwargs,
    )


def encoder_of(model: nn.Module) -> nn.Module:
    """The part whose pooled features kNN and linear probes evaluate."""
    if isinstance(model, Supervised):
        net = model.model
        return lambda images: net.forward_head(net.forward_features(images), pre_logits=True)
    return model.backbone


def family_of(model: nn.Module) -> str:
    """``"vit"`` or ``"cnn"`` for what :func:`build_model` returns."""
    if isinstance(model, Supervised):
        return "vit" if hasattr(model.model, "patch_embed") else "cnn"
    return backbone_family(model.backbone)


def checkpoint_dir(cfg: TrainConfig) -> Path:
    """Where a run keeps its checkpoints: ``run.out/checkpoints``."""
    return Path(cfg.run.out) / "checkpoints"
