"""Backbone adapters: any timm model as the few calls the objectives need.

Two families. ``ViTBackbone`` wraps any timm vision transformer that has
``patch_embed``, ``pos_embed``, ``blocks`` and ``norm`` (vit_*, deit_*, ...):
embed, encode only the visible tokens of a :class:`PatchMask`, or encode with
a mask token. ``CNNBackbone`` wraps a timm model built with
``features_only=True`` (resnet*, convnext*, ...): multi-stage features, with
hidden regions replaced at pixel level. Both give the guidance that
model-guided masks use, under ``no_grad``: ``saliency`` and ``affinity``.
Attention is read with a forward hook on timm's own ``attn_drop`` (its
unfused path), never by re-implementing a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from masklab.transforms import MASKED, THROWN, PatchMask, patch_grid

from ._common import gather_tokens

__all__ = [
    "CNNBackbone",
    "ViTBackbone",
    "backbone_family",
    "build_backbone",
    "create_timm",
    "minmax",
    "sincos_pos_embed",
    "small_image_stem",
]

_VIT_PARTS = ("patch_embed", "pos_embed", "blocks", "norm")


def backbone_family(model: nn.Module) -> str:
    """``"vit"`` or ``"cnn"`` for a timm model (or an adapter), else ``ValueError``."""
    if isinstance(model, (ViTBackbone, CNNBackbone)):
        return model.family
    if all(hasattr(model, part) for part in _VIT_PARTS):
        return "vit"
    if hasattr(model, "feature_info") and callable(getattr(model.feature_info, "reduction", None)):
        return "cnn"
    raise ValueError(
        f"{type(model).__name__} is neither a ViT (needs {', '.join(_VIT_PARTS)}) "
        "nor a features_only CNN (timm.create_model(..., features_only=True))"
    )


def minmax(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Rescale ``x`` to ``[0, 1]`` over ``dims`` (constant slices become 0)."""
    low = x.amin(dim=dims, keepdim=True)
    high = x.amax(dim=dims, keepdim=True)
    return (x - low) / (high - low).clamp(min=1e-12)


def sincos_pos_embed(
    grid: tuple[int, int],
    dim: int,
    num_prefix: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position table: ``(num_prefix + Gh * Gw, dim)``.

    The cells come row-major; cell ``(i, j)`` (row ``i``, column ``j``) gets
    ``[sin(j w), cos(j w), sin(i w), cos(i w)]``, each a block over the
    ``dim / 4`` frequencies ``w_k = 10000 ** (-k / (dim / 4))``: the column first, as
    MAE's ``get_2d_sincos_pos_embed`` lays it out (its ``np.meshgrid`` puts the
    width coordinate in the half it names ``emb_h``). timm's
    ``build_sincos2d_pos_embed`` gives the same values with the row first; this
    swaps the halves so the table equals MAE's. The prefix (class) tokens get
    zeros, as MAE's class-token position. Rectangular grids are our
    generalisation (MAE builds square ones).

    Args:
        grid: ``(Gh, Gw)``.
        dim: the embedding width, divisible by 4.
        num_prefix: zero rows put in front, one per prefix token.
        device: where to build it.
        dtype: its dtype.

    Examples:
        >>> table = sincos_pos_embed((2, 3), 8, num_prefix=1)
        >>> tuple(table.shape), table[0].abs().sum().item()
        ((7, 8), 0.0)
        >>> [round(v, 3) for v in table[1 + 1].tolist()]  # cell (0, 1): sin(1 w), cos(1 w), sin(0 w), cos(0 w)
        [0.841, 0.01, 0.54, 1.0, 0.0, 0.0, 1.0, 1.0]
    """
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine position embedding needs a width divisible by 4, got {dim}")
    rows_first = build_sincos2d_pos_embed(list(grid), dim, interleave_sin_cos=True, device=device, dtype=dtype)
    table = torch.cat([rows_first[:, dim // 2 :], rows_first[:, : dim // 2]], dim=1)
    return torch.cat([table.new_zeros(num_prefix, dim), table])


@contextlib.contextmanager
def _attention_probe(
    blocks: list[nn.Module], read: Callable[[torch.Tensor], object] | None = None
) -> Iterator[list[torch.Tensor]]:
    """Collect each block's softmax attention ``(B, heads, T, T)`` during a forward pass.

    timm's ``AttentionExtract`` hooks the same ``attn_drop`` modules, but its hooks stay on and it
    leaves fused attention (whose path never calls ``attn_drop``) as it is; the guides run mid-training,
    so this probe turns fusion off for the one pass and puts everything back.

    Args:
        blocks: the blocks to read.
        read: called with each block's attention as the pass reaches it (its return value unused), instead
            of keeping it in the yielded list (so a reduction over blocks holds one block's maps at a time).
    """
    captured: list[torch.Tensor] = []
    keep = captured.append if read is None else read

    def hook(_module, _inputs, out: torch.Tensor) -> None:  # returns None: a forward hook's value would replace out
        keep(out)

    handles, fused = [], []
    for block in blocks:
        attn = block.attn
        if not hasattr(attn, "attn_drop"):
            raise ValueError(f"{type(attn).__name__} has no attn_drop to read attention from")
        fused.append(getattr(attn, "fused_attn", False))
        attn.fused_attn = False  # the unfused path materialises the softmax attention
        handles.append(attn.attn_drop.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for block, was_fused in zip(blocks, fused, strict=True):
            block.attn.fused_attn = was_fused


class ViTBackbone(nn.Module):
    """A timm vision transformer as token operations on a :class:`PatchMask`.

    Args:
        model: a timm ViT (``num_classes=0`` is enough; the head is unused).

    Examples:
        >>> import torch
        >>> from masklab.transforms import random_patch_mask
        >>> vit = ViTBackbone.from_name("vit_tiny_patch16_224", img_size=32, patch_size=8)
        >>> mask = random_patch_mask(2, vit.grid_size, 0.75)
        >>> tuple(vit.encode_visible(torch.rand(2, 3, 32, 32), mask).shape)
        (2, 5, 192)
    """

    family = "vit"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        missing = [part for part in _VIT_PARTS if not hasattr(model, part)]
        if missing:
            raise ValueError(f"{type(model).__name__} is not a timm ViT: it lacks {', '.join(missing)}")
        if getattr(model, "dynamic_img_size", False):
            raise ValueError("dynamic_img_size ViTs are not supported; build the model with the training img_size")
        self.model = model
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.embed_dim = int(model.embed_dim)
        self.num_prefix = int(model.num_prefix_tokens)

    @classmethod
    def from_name(cls, name: str, img_size: int = 224, patch_size: int | None = None, **kwargs: Any) -> ViTBackbone:
        """Build ``timm.create_model(name, pretrained=False, img_size=..., num_classes=0)``."""
        import timm

        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        return cls(timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **kwargs))

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.model.patch_embed.grid_size)

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """The ``(Gh, Gw)`` patch grid of ``images`` at this backbone's patch size (any image size it takes)."""
        return patch_grid(images.shape[-2], images.shape[-1], self.patch_size)

    def fix_pos_embed(self) -> None:
        """Make the model's position embedding MAE's fixed sine-cosine table, frozen (``requires_grad=False``).

        The table is :func:`sincos_pos_embed` on :attr:`grid_size`, with zero
        rows for the prefix tokens the model gives positions to (timm's
        ``no_embed_class`` models give them none). It stays the model's
        ``pos_embed`` parameter, so it is saved and loaded with the weights, an
        optimizer built from ``requires_grad`` parameters leaves it out, and the
        encoder evaluated or exported keeps it.
        """
        pos = getattr(self.model, "pos_embed", None)
        if not isinstance(pos, nn.Parameter):
            raise ValueError(
                f"{type(self.model).__name__} has no pos_embed parameter to fix (built with pos_embed='none'?)"
            )
        gh, gw = self.grid_size
        prefix = pos.shape[1] - gh * gw
        if prefix not in (0, self.num_prefix):
            raise ValueError(
                f"pos_embed has {pos.shape[1]} positions; expected the {gh * gw} cells, "
                f"plus the {self.num_prefix} prefix tokens or none"
            )
        table = sincos_pos_embed((gh, gw), pos.shape[-1], prefix, device=pos.device, dtype=pos.dtype)
        with torch.no_grad():
            pos.copy_(table.unsqueeze(0))
        pos.requires_grad_(False)

    def embed(
        self, images: torch.Tensor, replace: torch.Tensor | None = None, token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, P + N, D)`` prefix and patch tokens with position embeddings.

        ``replace`` (``(B, N)`` bool) swaps those patch embeddings for
        ``token`` (``(D,)``) before position embeddings are added (SimMIM).
        """
        x = self.model.patch_embed(images)
        if replace is not None:
            x = torch.where(replace.unsqueeze(-1), token.to(x.dtype), x)
        x = self.model._pos_embed(x)
        x = self.model.patch_drop(x)
        return self.model.norm_pre(x)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        # The adapter runs the blocks itself, so it honours timm's set_grad_checkpointing() flag here.
        if getattr(self.model, "grad_checkpointing", False) and torch.is_grad_enabled():
            from timm.models import checkpoint_seq

            return self.model.norm(checkpoint_seq(self.model.blocks, tokens))
        return self.model.norm(self.model.blocks(tokens))

    def encode_visible(self, images: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        """Encode the prefix tokens and the VISIBLE patches only: ``(B, P + n_visible, D)``.

        The visible patches come in :attr:`PatchMask.ids_keep` order.
        """
        tokens = self.embed(images)
        prefix, patches = tokens[:, : self.num_prefix], tokens[:, self.num_prefix :]
        return self._encode(torch.cat([prefix, gather_tokens(patches, mask.ids_keep)], dim=1))

    def encode_with_mask_token(
        self, images: torch.Tensor, mask: PatchMask, token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SimMIM's encoding: MASKED patches become ``token``, THROWN patches are dropped.

        Returns:
            ``(B, n_kept, D)`` patch outputs (prefix removed) and ``(B, n_kept)``
            their cell indices, ascending; ``n_kept = N - n_thrown``.
        """
        tokens = self.embed(images, replace=mask.masked.flatten(1), token=token)
        prefix, patches = tokens[:, : self.num_prefix], tokens[:, self.num_prefix :]
        kept = mask.num_visible + mask.num_masked
        ids = mask.ids_shuffle[:, :kept].sort(dim=1).values if mask.num_thrown else None
        if ids is not None:
            patches = gather_tokens(patches, ids)
        else:
            ids = torch.arange(patches.shape[1], device=images.device).expand(images.shape[0], -1)
        out = self._encode(torch.cat([prefix, patches], dim=1))
        return out[:, self.num_prefix :], ids

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features for evaluation (timm's own pooling)."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    @torch.no_grad()
    def saliency(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Last block's CLS-to-patch attention: ``(B, Gh, Gw)`` in ``[0, 1]``.

        Per head min-max normalised, then averaged over heads (AMT). Models
        without a class token use the mean attention each patch receives.
        """
        gh, gw = self.grid(images)
        with _attention_probe([self.model.blocks[-1]]) as captured:
            self._encode(self.embed(images))
        attn = captured[-1].float()  # (B, heads, T, T)
        p = self.num_prefix
        scores = attn[:, :, 0, p:] if p else attn.mean(dim=2)
        scores = minmax(scores, dims=(2,)).mean(dim=1)
        return _resize(scores.view(-1, gh, gw), grid)

    @torch.no_grad()
    def affinity(self, images: torch.Tensor) -> torch.Tensor:
        """Patch-to-patch softmax attention summed over layers and heads, symmetrised: ``(B, N, N)``.

        Each block's maps are added to a float32 total as the pass reaches them, so the pass holds one
        block's ``(B, heads, T, T)`` attention at a time, not every block's.
        """
        p, (gh, gw) = self.num_prefix, self.grid(images)
        total = images.new_zeros(images.shape[0], gh * gw, gh * gw, dtype=torch.float32)
        with _attention_probe(list(self.model.blocks), lambda attn: total.add_(attn[:, :, p:, p:].float().sum(1))):
            self._encode(self.embed(images))
        return (total + total.transpose(1, 2)) / 2


def _resize(maps: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    if grid is None or tuple(maps.shape[-2:]) == tuple(grid):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=grid, mode="bilinear", align_corners=False, antialias=True).squeeze(1)


class CNNBackbone(nn.Module):
    """A timm ``features_only`` CNN: multi-stage features, masks at pixel level.

    Args:
        model: ``timm.create_model(name, features_only=True)``.

    Examples:
        >>> import torch
        >>> cnn = CNNBackbone.from_name("resnet18")
        >>> [tuple(f.shape) for f in cnn.features(torch.rand(1, 3, 64, 64))][-1], cnn.strides[-1]
        ((1, 512, 2, 2), 32)
    """

    family = "cnn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if backbone_family(model) != "cnn":
            raise ValueError(f"{type(model).__name__} is not a features_only CNN")
        self.model = model
        self.strides = tuple(int(s) for s in model.feature_info.reduction())
        self.channels = tuple(int(c) for c in model.feature_info.channels())

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> CNNBackbone:
        """Build ``timm.create_model(name, pretrained=False, features_only=True)``."""
        import timm

        return cls(timm.create_model(name, pretrained=False, features_only=True, **kwargs))

    @property
    def embed_dim(self) -> int:
        return self.channels[-1]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One ``(B, C_s, H / s, W / s)`` map per stage, finest first."""
        return list(self.model(images))

    def hide(self, images: torch.Tensor, mask: PatchMask, token: torch.Tensor) -> torch.Tensor:
        """Replace the pixels of MASKED and THROWN cells by ``token`` (``(C,)``)."""
        states = mask.to_pixels(*images.shape[-2:]).unsqueeze(1)
        hidden = (states == MASKED) | (states == THROWN)
        return torch.where(hidden, token.view(1, -1, 1, 1).to(images.dtype), images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled last-stage features for evaluation: ``(B, C)``."""
        return self.features(images)[-1].mean(dim=(2, 3))

    @torch.no_grad()
    def saliency(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Activation norm of the last stage, on ``grid``, min-max normalised per image (our generalisation)."""
        last = self.features(images)[-1].float()
        scores = _resize(last.norm(dim=1) / last.shape[1] ** 0.5, grid)
        return minmax(scores, dims=(1, 2))

    @torch.no_grad()
    def affinity(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Cosine similarity of last-stage features on ``grid``: ``(B, N, N)``, symmetric."""
        last = self.features(images)[-1].float()
        if grid is not None:
            last = F.interpolate(last, size=grid, mode="bilinear", align_corners=False)
        flat = F.normalize(last.flatten(2), dim=1)  # (B, C, N)
        return flat.transpose(1, 2) @ flat


def small_image_stem(model: nn.Module) -> nn.Module:
    """Give a timm ResNet the stem for small images, in place: a 3x3 stride-1 ``conv1`` and no max-pool.

    The CIFAR-style ResNet stem (He et al., 2016, section 4.2; SimCLR's and
    MixMask's CIFAR runs): at 32 px the ImageNet stem (7x7 stride 2, then a
    stride-2 max-pool) would leave 8x8 maps after the stem and 1x1 at the end.
    Works on a classifier or a ``features_only`` model; the latter's
    ``feature_info`` reductions are updated (1, 1, 2, 4, 8 for a ResNet).

    Args:
        model: a timm ResNet-family model whose ``conv1`` is one ``nn.Conv2d`` (not a deep stem).

    Returns:
        ``model``, changed.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"small_stem needs a ResNet-style model with a single conv1 and a maxpool; {type(model).__name__} "
            f"has conv1={type(conv).__name__}"
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    info = getattr(model, "feature_info", None)
    if info is not None and callable(getattr(info, "reduction", None)):
        with torch.no_grad():
            was_training = model.training
            maps = model.eval()(torch.zeros(1, conv.in_channels, 32, 32))
            model.train(was_training)
        for entry, feature in zip(info.info, maps, strict=True):
            entry["reduction"] = 32 // feature.shape[-1]
    return model


def create_timm(
    name: str, img_size: int, patch_size: int | None = None, small_stem: bool = False, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)`` with ``img_size``/``patch_size`` for models
    that take them (transformers); CNNs, which refuse them, are built without. ``small_stem`` applies
    :func:`small_image_stem`."""
    import timm

    vit_kwargs = {"img_size": img_size, **({"patch_size": patch_size} if patch_size else {})}
    try:
        model = timm.create_model(name, pretrained=False, **vit_kwargs, **kwargs)
    except TypeError:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return small_image_stem(model) if small_stem else model


def build_backbone(
    name: str, img_size: int = 224, patch_size: int | None = None, small_stem: bool = False, **kwargs: Any
) -> ViTBackbone | CNNBackbone:
    """An adapter for the timm model ``name``: a ViT when it has ViT parts, else a features_only CNN.

    Args:
        name: a timm model name (never pretrained).
        img_size: the training image side (ViTs).
        patch_size: the ViT patch (``None`` keeps the model's).
        small_stem: CNNs: a 3x3 stride-1 stem without max-pool for small images (:func:`small_image_stem`).
        **kwargs: passed to ``timm.create_model``.

    Returns:
        A :class:`ViTBackbone` or :class:`CNNBackbone`.
    """
    model = create_timm(name, img_size, patch_size, num_classes=0, **kwargs)
    if all(hasattr(model, part) for part in _VIT_PARTS):
        if small_stem:
            raise ValueError(f"small_stem is for CNNs; {name} is a ViT (choose its patch_size instead)")
        return ViTBackbone(model)
    return CNNBackbone(create_timm(name, img_size, features_only=True, small_stem=small_stem, **kwargs))
