"""Encoders out: a trained backbone as a plain timm model folder (``model.safetensors`` + ``config.json``)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masklab.objectives import CNNBackbone, EMATeacher
from masklab.objectives.supervised import Supervised
from masklab.pipeline.writer import replace_atomically

from .config import TrainConfig
from .trained import load_trained

__all__ = [
    "EXPORT_PARTS",
    "export_encoder",
    "export_folder_config",
    "export_overrides",
    "load_export",
    "plain_timm_state",
    "read_export",
]

EXPORT_PARTS = ("encoder", "teacher")
"""What :func:`export_encoder` can write: the online encoder, or the EMA teacher's copy of it."""

_LOAD_SNIPPET = """\
import timm

model = timm.create_model("local-dir:{folder}", pretrained=True)
# or, with any timm 1.x:
model = timm.create_model(
    "{architecture}", pretrained=True, pretrained_cfg_overlay=dict(file="{folder}/model.safetensors"), **{kwargs}
)
"""

_SMALL_STEM_SNIPPET = """\
import timm
import torch
from safetensors.torch import load_file

# A masklab small-image stem (3x3 stride-1 conv1, no max-pool), which timm's kwargs cannot rebuild:
model = timm.create_model("{architecture}", pretrained=False, **{kwargs})
model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
model.maxpool = torch.nn.Identity()
model.load_state_dict(load_file("{folder}/model.safetensors"))
"""


def _normalised(key: str) -> str:
    return re.sub(r"[._]", "_", key)


def plain_timm_state(features_only: nn.Module, plain: nn.Module) -> dict[str, torch.Tensor]:
    """A ``features_only`` timm model's weights under the key names of the same architecture's plain model.

    timm's feature wrappers flatten the model's top-level sequences (``layer1.0`` becomes
    ``layer1_0``), so keys are matched with ``.`` and ``_`` treated alike. Every feature weight must
    find exactly one plain key of the same shape; the plain model's remaining weights (its head) stay
    out.

    Raises:
        ValueError: a weight with no match, several, or another shape.
    """
    targets: dict[str, list[str]] = {}
    plain_state = plain.state_dict()
    for key in plain_state:
        targets.setdefault(_normalised(key), []).append(key)
    state = {}
    for key, value in features_only.state_dict().items():
        found = targets.get(_normalised(key), [])
        if len(found) != 1 or plain_state[found[0]].shape != value.shape:
            raise ValueError(
                f"cannot place the feature weight {key!r} {tuple(value.shape)} in {type(plain).__name__}: "
                f"candidates {found}"
            )
        state[found[0]] = value
    return state


def _teacher_copy(objective: nn.Module, backbone: nn.Module) -> nn.Module:
    teachers = [m for m in objective.modules() if isinstance(m, EMATeacher)]
    if not teachers:
        raise ValueError(
            f"--include teacher: the {type(objective).__name__} objective keeps no EMA teacher; export the encoder"
        )
    for module in teachers[0].module.modules():
        if type(module) is type(backbone):
            return module
    raise ValueError(f"the EMA teacher of {type(objective).__name__} holds no copy of the backbone")


def export_folder_config(cfg: TrainConfig, architecture: str, kwargs: dict[str, Any], num_features: int) -> dict:
    """The ``config.json`` timm reads from a model folder (``local-dir:`` or the Hugging Face Hub layout)."""
    size = cfg.data.resolution
    return {
        "architecture": architecture,
        "num_classes": int(kwargs.get("num_classes", 0)),
        "num_features": int(num_features),
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "num_classes": int(kwargs.get("num_classes", 0)),
        },
    }


def _timm_model(cfg: TrainConfig, model: nn.Module, include: str) -> tuple[nn.Module, dict[str, Any], bool]:
    """``(plain timm model with the trained weights, its create_model kwargs, small stem?)``."""
    from masklab.objectives.backbones import create_timm

    kwargs = dict(cfg.model.kwargs)
    small_stem = bool(cfg.model.small_stem)
    if isinstance(model, Supervised):
        if include != "encoder":
            raise ValueError("--include teacher: a supervised model has no teacher")
        net = model.model
        kwargs["num_classes"] = int(net.num_classes)
        backbone: nn.Module = net
    else:
        backbone = model.backbone
        if include == "teacher":
            backbone = _teacher_copy(model, backbone)
        kwargs["num_classes"] = 0
        net = backbone.model
    if isinstance(backbone, CNNBackbone):
        plain = create_timm(cfg.model.backbone, cfg.data.resolution, small_stem=small_stem, **kwargs)
        plain.load_state_dict(plain_timm_state(backbone.model, plain), strict=False)
        net = plain
    if hasattr(net, "patch_embed"):  # a transformer: the sizes it was built with
        kwargs["img_size"] = cfg.data.resolution
        if cfg.model.patch_size:
            kwargs["patch_size"] = cfg.model.patch_size
    return net, kwargs, small_stem


def export_encoder(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    include: str = "encoder",
    overrides: list[str] | tuple[str, ...] = (),
    trust: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint's encoder as a timm model folder that plain timm loads, without masklab.

    The folder holds ``model.safetensors`` (the timm model's own state dict: a ViT with
    ``num_classes=0``, or the full CNN classifier architecture, whose head stays at its random
    initialisation since only the features were trained; a supervised model with its trained head),
    ``config.json`` in timm's layout (``architecture``, ``model_args`` such as ``img_size``,
    ``patch_size``, ``depth``, and ``pretrained_cfg`` with the training mean, std and input size)
    and a ``README.md`` with the lines that load it. Heads, projectors, decoders and queues stay out.

    Args:
        checkpoint: a masklab checkpoint (a ``ckpt-UPDATE`` folder).
        out_dir: the folder to write (created; an existing non-empty one needs ``overwrite``).
        include: ``encoder`` (default: the online network, which every objective trains and which the
            kNN and linear evaluations measure) or ``teacher`` (the EMA teacher's copy, what BYOL/MoCo
            users often keep; only objectives with a teacher have one).
        overrides: dotted config overrides applied to the checkpoint's config.
        trust: unpickle an older checkpoint that needs it (see :func:`~masklab.recipes.trained.load_trained`).
        overwrite: replace the files of an existing export folder.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: an unknown ``include``, a model without a teacher asked for one, or a non-empty
            ``out_dir`` without ``overwrite``.
    """
    if include not in EXPORT_PARTS:
        raise ValueError(f"include must be one of {EXPORT_PARTS}, got {include!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export folder {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"export folder {out} is not empty: choose another or pass overwrite (--overwrite)")
    cfg, model = load_trained(checkpoint, overrides, trust)
    net, kwargs, small_stem = _timm_model(cfg, model, include)
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    metadata = {"format": "pt", "masklab_checkpoint": str(checkpoint), "masklab_include": include}
    config = export_folder_config(cfg, cfg.model.backbone, kwargs, getattr(net, "num_features", 0))
    if small_stem:
        config["masklab_small_stem"] = True
    snippet = (_SMALL_STEM_SNIPPET if small_stem else _LOAD_SNIPPET).format(
        folder=out.resolve(), architecture=cfg.model.backbone, kwargs=repr(kwargs)
    )
    readme = (
        f"# {cfg.model.backbone} exported by masklab\n\n"
        f"The {include} of `{checkpoint}`. Load it with timm alone:\n\n```python\n{snippet}```\n"
    )

    def write(folder: Path) -> None:
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"), metadata=metadata)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "README.md").write_text(readme)

    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(write, out)
    return out


def read_export(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` of a timm model folder (an export), or ``None`` when ``folder`` is not one."""
    path = Path(folder)
    config_file = path / "config.json"
    if not (path.is_dir() and config_file.is_file() and (path / "model.safetensors").is_file()):
        return None
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise ValueError(f"{config_file} is not JSON: {error}") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise ValueError(f"{config_file} is not a timm model config: it names no 'architecture'")
    return config


def export_overrides(config: dict[str, Any]) -> list[str]:
    """The dotted config overrides that build an export's architecture in masklab (``model.*``, the resolution)."""
    args = dict(config.get("model_args") or {})
    size = args.pop("img_size", None) or (config.get("pretrained_cfg") or {}).get("input_size", [3, None, None])[-1]
    patch = args.pop("patch_size", None)
    args.pop("num_classes", None)
    kwargs = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in args.items()) + "}"
    out = [f"model.backbone={config['architecture']}", f"model.kwargs={kwargs}", f"model.patch_size={patch or 'null'}"]
    if config.get("masklab_small_stem"):
        out.append("model.small_stem=true")
    if size:
        out.append(f"data.resolution={int(size)}")
    return out


def load_export(
    folder: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[TrainConfig, nn.Module]:
    """``(config, plain timm model)`` of an export folder, weights loaded, in eval mode.

    The config is the defaults with the export's architecture, then ``overrides`` (the data to
    evaluate on, for instance).

    Raises:
        ValueError: ``folder`` is not an export, or its weights do not fit the architecture.
    """
    from safetensors.torch import load_file

    from masklab.objectives.backbones import create_timm

    from .config import load_config

    config = read_export(folder)
    if config is None:
        raise ValueError(f"{folder} is not an exported model folder (config.json + model.safetensors)")
    cfg = load_config(None, [*export_overrides(config), *overrides])
    num_classes = int((config.get("model_args") or {}).get("num_classes", 0))
    net = create_timm(
        cfg.model.backbone,
        cfg.data.resolution,
        cfg.model.patch_size,
        cfg.model.small_stem,
        num_classes=num_classes,
        **cfg.model.kwargs,
    )
    weights = load_file(str(Path(folder) / "model.safetensors"))
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"the weights in {folder} do not fit {cfg.model.backbone}: {error}") from None
    return cfg, net.eval()
