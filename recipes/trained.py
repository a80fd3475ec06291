"""After training: a checkpoint's model, and the accuracy of an encoder's frozen features (kNN, linear probe)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .accelerator import resolve_device
from .build import build_loader, build_model, encoder_of, family_of
from .checkpoint import checkpoint_backbone, fit_weights, load_checkpoint, trained_config
from .config import TrainConfig, load_config, to_dict
from .evaluate import extract_features, knn_accuracy, linear_probe_accuracy

__all__ = ["evaluate_checkpoint", "evaluate_encoder", "evaluate_knn", "load_trained"]


def evaluate_encoder(
    cfg: TrainConfig,
    encoder: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    family: str,
    kinds: tuple[str, ...] = ("knn",),
    loaders: tuple[Any, Any] | None = None,
    gather: Callable | None = None,
) -> dict[str, float]:
    """Accuracy of ``encoder``'s pooled features, train split against test split, for each of ``kinds``.

    ``kinds`` holds ``knn`` (``cfg.eval.knn_k``, ``knn_temperature``) and/or
    ``linear`` (a probe of ``cfg.eval.linear_epochs`` epochs at ``linear_lr``);
    the features are extracted once for all of them. ``loaders``: the
    (train, test) evaluation loaders to reuse (an FFCV loader compiles its
    pipeline once, a few seconds on a CPU); built from ``cfg`` when ``None``. ``gather``: the loaders
    are sharded over processes, and this collects every process's features
    (see :func:`~masklab.recipes.evaluate.extract_features`); every process gets the same scores.
    """
    if not kinds or any(k not in ("knn", "linear") for k in kinds):
        raise ValueError(f"evaluation must be knn and/or linear, got {list(kinds)}")
    was_training = getattr(encoder, "training", False)
    if hasattr(encoder, "eval"):
        encoder.eval()
    if loaders is None:
        loaders = tuple(build_loader(cfg, split, device, family, train=False) for split in ("eval", "test"))
    train_set, test_set = (extract_features(encoder, loader, gather) for loader in loaders)
    if was_training:
        encoder.train()
    scores = {}
    if "knn" in kinds:
        scores["knn"] = knn_accuracy(*train_set, *test_set, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    if "linear" in kinds:
        scores["linear"] = linear_probe_accuracy(
            *train_set, *test_set, epochs=cfg.eval.linear_epochs, lr=cfg.eval.linear_lr
        )
    return scores


def evaluate_knn(
    cfg: TrainConfig, encoder: Callable[[torch.Tensor], torch.Tensor], device: torch.device, family: str
) -> float:
    """kNN accuracy of ``encoder``'s pooled features, train split against test split."""
    return evaluate_encoder(cfg, encoder, device, family, ("knn",))["knn"]


def load_trained(
    checkpoint: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), trust: bool = False
) -> tuple[TrainConfig, nn.Module]:
    """``(config, model)`` of a checkpoint (its config, then ``overrides``), weights loaded, in eval mode.

    Only the checkpoint's weights and config are read (``model.safetensors``), never unpickled
    unless ``trust`` and the checkpoint is an older single ``.pt`` file that needs it.
    ``checkpoint`` may be ``random``: the model of ``overrides``' config at random initialisation.

    Raises:
        FileNotFoundError: no such checkpoint.
        CheckpointError: not a checkpoint, refused (see :func:`~masklab.recipes.checkpoint.load_checkpoint`),
            no config recorded, or weights that do not fit the model the config builds.
    """
    if str(checkpoint) == "random":
        trained = None
        cfg = load_config(None, list(overrides))
    else:
        trained = load_checkpoint(checkpoint, trust=trust, training_state=False)
        cfg = trained_config(trained, overrides)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    if trained is not None:
        source, requested = checkpoint_backbone(trained.config), checkpoint_backbone(to_dict(cfg))
        fit_weights(model, trained.model, trained.path, source, requested)
    return cfg, model.eval()


def evaluate_checkpoint(
    checkpoint: str | os.PathLike, kind: str = "knn", overrides: list[str] | tuple[str, ...] = (), trust: bool = False
) -> dict[str, float]:
    """kNN or linear-probe accuracy of a checkpoint's encoder (its config, then ``overrides``).

    ``checkpoint`` may also be ``random``: the encoder of ``overrides``'
    config at random initialisation (the baseline a trained one must beat), or a folder written by
    :func:`~masklab.recipes.export.export_encoder` (a timm model folder: its architecture, then
    ``overrides``).
    ``trust``: see :func:`load_trained`.
    """
    if kind not in ("knn", "linear"):
        raise ValueError(f"evaluation must be knn or linear, got {kind!r}")
    from .export import load_export, read_export

    if str(checkpoint) != "random" and read_export(checkpoint) is not None:
        cfg, net = load_export(checkpoint, overrides)
        device = resolve_device(cfg.run.device)
        net.to(device)
        family = "vit" if hasattr(net, "patch_embed") else "cnn"

        def encoder(images: torch.Tensor) -> torch.Tensor:
            return net.forward_head(net.forward_features(images), pre_logits=True)

        return evaluate_encoder(cfg, encoder, device, family, (kind,))
    cfg, model = load_trained(checkpoint, overrides, trust)
    device = resolve_device(cfg.run.device)
    model.to(device)
    return evaluate_encoder(cfg, encoder_of(model), device, family_of(model), (kind,))
