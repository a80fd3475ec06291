"""MAE: reconstruct the pixels of masked patches from the visible ones."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from masklab.pipeline import Batch
from masklab.transforms import MaskOptions, PatchMask

from ._common import GuidanceMixin, ObjectiveOutput, TeacherOptions, gather_tokens, patchify, unpatchify
from .backbones import ViTBackbone, sincos_pos_embed
from .compat import check_family
from .registry import register_objective

__all__ = ["MAE", "MAEOptions", "mae_loss", "mae_patch_losses"]


def mae_patch_losses(
    pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Each patch's mean squared error: ``(B, n)``; :func:`mae_loss` is their mean.

    Args:
        pred: ``(B, n, p * p * C)`` predictions of the masked patches.
        target: ``(B, n, p * p * C)`` their pixels.
        norm_pix: normalise each target patch by its own mean and variance (MAE's default).
        eps: added to the variance.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    return (pred - target).pow(2).mean(dim=-1)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch mean squared error, averaged over the given (masked) patches (see :func:`mae_patch_losses`)."""
    return mae_patch_losses(pred, target, norm_pix, eps).mean()


def check_decoder_size(kind: str, width: int, heads: int, depth: int) -> None:
    """Raise ``ValueError`` unless a decoder-like transformer of ``width``, ``heads`` and ``depth`` can be built
    (``kind`` names its options in the message: ``decoder`` or ``predictor``)."""
    if width % heads or width % 4:
        raise ValueError(f"{kind}_dim={width} must be divisible by 4 and by {kind}_heads={heads}")
    if depth < 1:
        raise ValueError(f"{kind}_depth must be at least 1, got {depth}")


def decoder_blocks(width: int, heads: int, depth: int) -> nn.Sequential:
    r"""MAE's decoder blocks: ``depth`` timm ``Block``\ s with ``qkv_bias`` and LayerNorm ``eps=1e-6``."""
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])


def positioned_tokens(latent: torch.Tensor, mask: PatchMask, num_prefix: int, mask_token: torch.Tensor) -> torch.Tensor:
    """``(B, P + n_visible + n_masked, D)``: the prefix tokens, the encoded VISIBLE patches (``latent`` after the
    prefix, ``mask.ids_keep`` order) and ``mask_token`` at each MASKED cell (``mask.ids_masked`` order), each
    patch with its fixed sine-cosine position; THROWN cells are left out. A transformer is order-free given
    positions, so nothing is un-shuffled (MAE's decoder input, I-JEPA's predictor input)."""
    pos = sincos_pos_embed(mask.grid, latent.shape[-1], device=latent.device, dtype=latent.dtype)  # (Gh * Gw, D)
    visible = latent[:, num_prefix:] + pos[mask.ids_keep]
    masked = mask_token.to(latent.dtype) + pos[mask.ids_masked]
    return torch.cat([latent[:, :num_prefix], visible, masked], dim=1)


def _init_decoder(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linear weights with zero biases, LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@dataclass
class MAEOptions(TeacherOptions):
    """``objective.name: mae``: the decoder's width and depth, per-patch normalised targets, the encoder's
    positions, a teacher."""

    decoder_dim: int = 128
    decoder_depth: int = 2
    norm_pix: bool = True
    fixed_pos_embed: bool = True  # the encoder's positions: MAE's frozen sine-cosine table; false: the backbone's own


@register_objective(
    "mae", options=MAEOptions, takes="patch", families=("vit",), small=lambda: MAEOptions(teacher_decay=0.99)
)
class MAE(GuidanceMixin, nn.Module):
    """Masked autoencoder (He et al., 2022) on a :class:`ViTBackbone`.

    The encoder sees the VISIBLE patches only; a light decoder sees them and a
    mask token at every MASKED cell (with fixed sine-cosine positions);
    THROWN cells appear nowhere: not in the encoder, not in the decoder, not
    in the loss. The loss is :func:`mae_loss` over MASKED patches.

    As in MAE's ``models_mae.py``: the encoder's positions are the fixed
    sine-cosine table (:meth:`ViTBackbone.fix_pos_embed`, done here to the
    backbone given); the decoder's blocks have ``qkv_bias=True`` and
    LayerNorms with ``eps=1e-6``; its linear layers start xavier-uniform with
    zero biases, its LayerNorms at weight 1 and bias 0, the mask token
    ``normal(std=0.02)``. MAE also gives its own encoder that initialisation;
    here the encoder is timm's, with timm's initialisation. MAE's decoder
    width and depth (512, 8) are for ImageNet; the defaults here are sized for
    32 px images and short runs.

    Args:
        backbone: a :class:`ViTBackbone`.
        decoder_dim: decoder width (divisible by 4 and by ``decoder_heads``).
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads.
        norm_pix: per-patch normalised targets.
        fixed_pos_embed: give the backbone MAE's frozen sine-cosine positions; ``False`` keeps its own
            (timm's are learned).
        teacher_decay: keep an EMA teacher of the backbone with this starting
            decay (cosine to ``teacher_final_decay``); it guides EHM's
            affinity. ``None``: no teacher.
        teacher_final_decay: the teacher's decay at the end of training.
    """

    name = "mae"

    def __init__(
        self,
        backbone: ViTBackbone,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix: bool = True,
        teacher_decay: float | None = None,
        teacher_final_decay: float = 1.0,
        fixed_pos_embed: bool = True,
    ) -> None:
        super().__init__()
        check_family(self.name, backbone)
        check_decoder_size("decoder", decoder_dim, decoder_heads, decoder_depth)
        if fixed_pos_embed:
            backbone.fix_pos_embed()  # before the teacher copies the backbone
        self.backbone = backbone
        self.norm_pix = norm_pix
        patch = backbone.patch_size
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder = decoder_blocks(decoder_dim, decoder_heads, decoder_depth)
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch * patch * 3)
        for part in (self.decoder_embed, self.decoder, self.decoder_norm, self.decoder_pred):
            part.apply(_init_decoder)
        nn.init.normal_(self.mask_token, std=0.02)
        self.add_teacher(teacher_decay, teacher_final_decay)

    @classmethod
    def from_options(cls, backbone: ViTBackbone, options: MAEOptions, mask: MaskOptions, **extra: Any) -> MAE:
        """Build from the config's sections; ``extra``: a subclass's own arguments."""
        return cls(
            backbone,
            options.decoder_dim,
            options.decoder_depth,
            norm_pix=options.norm_pix,
            fixed_pos_embed=options.fixed_pos_embed,
            **options.teacher(mask),
            **extra,
        )

    def decoder_tokens(self, images: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """The decoder's input: ``(B, P + n_visible + n_masked, D)``, the prefix tokens, the encoded VISIBLE
        patches (``mask.ids_keep`` order) and a mask token at each MASKED cell (``mask.ids_masked`` order),
        each with its sine-cosine position."""
        latent = self.decoder_embed(self.backbone.encode_visible(images, mask))
        return positioned_tokens(latent, mask, self.backbone.num_prefix, self.mask_token)

    def predict(self, images: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """``(B, n_masked, p * p * 3)`` predictions for the MASKED cells, in ``mask.ids_masked`` order."""
        return self.reconstruct_tokens(self.decoder_tokens(images, mask), mask)

    def reconstruct_tokens(self, tokens: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """The decoder on :meth:`decoder_tokens`: ``(B, n_masked, p * p * 3)`` for the MASKED cells."""
        out = self.decoder_pred(self.decoder_norm(self.decoder(tokens)))
        return out[:, self.backbone.num_prefix + mask.num_visible :]

    def patch_mask(self, batch: Batch) -> PatchMask:
        """``batch.mask``, or a ``ValueError`` saying what is missing."""
        mask = batch.mask
        if not isinstance(mask, PatchMask):
            raise ValueError(
                f"{type(self).__name__} needs a PatchMask in batch.mask: add a mask stage (RandomMask, BlockMask, ...)"
            )
        if mask.num_masked == 0:
            raise ValueError(f"{type(self).__name__} needs at least one MASKED cell per sample")
        return mask

    def forward(self, batch: Batch) -> ObjectiveOutput:
        mask = self.patch_mask(batch)
        pred = self.predict(batch.images, mask)
        patches = patchify(batch.images, self.backbone.patch_size)
        target = gather_tokens(patches, mask.ids_masked)
        loss = mae_loss(pred, target, self.norm_pix)
        return ObjectiveOutput(loss, {"loss": loss.detach(), "masked": torch.tensor(float(mask.num_masked))})

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """``(B, 3, H, W)`` in the images' (normalised) space: VISIBLE patches as given, MASKED patches
        predicted, THROWN patches zero (what ``masklab show-recon`` draws).

        With ``norm_pix`` the predictions are per-patch normalised; they are mapped back with each
        true patch's mean and variance, as MAE's own visualisation does (a picture, not an evaluation).
        """
        p = self.backbone.patch_size
        pred = self.predict(images, mask)
        patches = patchify(images, p)
        if self.norm_pix:
            target = gather_tokens(patches, mask.ids_masked)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        full = torch.zeros_like(patches)
        full = full.scatter(
            1, mask.ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), gather_tokens(patches, mask.ids_keep)
        )
        full = full.scatter(1, mask.ids_masked.unsqueeze(-1).expand_as(pred), pred.to(full.dtype))
        return unpatchify(full, p, mask.grid)
