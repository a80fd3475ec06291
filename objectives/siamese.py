"""Siamese objectives on two views: MoCo v2, BYOL and SimSiam, the bases MixMask builds on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from masklab.pipeline import Batch, batch_generator
from masklab.transforms import MaskOptions

from ._common import GuidanceMixin, ObjectiveOutput, two_views
from .backbones import CNNBackbone, ViTBackbone
from .compat import check_family
from .ema import EMATeacher
from .heads import HeadOptions, predictor_mlp, projection_mlp
from .infonce import KeyQueue, infonce_loss
from .negative_cosine import negative_cosine
from .registry import register_objective
from .shuffle_bn import shuffle_bn

__all__ = ["BASES", "BaseSpec", "Siamese", "SiameseOptions"]

_KEY_SHUFFLE_SALT = 0x5B0F
"""Salts the batch's seed for the key shuffle, apart from the loader's stages."""

PairLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``base(q, k) -> (B,)``: one loss per sample for queries ``q`` against their keys ``k``."""


@dataclass(frozen=True)
class BaseSpec:
    """A siamese base's defaults: heads, target network and loss.

    Attributes:
        hidden: projector hidden width.
        dim: projector output (the embedding the loss sees).
        layers: projector linear layers.
        bn: batch norm in the projector's hidden layers.
        last_bn: a batch norm on the projector's output.
        pred_hidden: predictor hidden width; ``None``: no predictor.
        momentum: ``(base, final)`` EMA decay of the target network; ``None``: the target is the
            online network under stop-gradient.
        symmetric: add the loss with the views' roles swapped.
        contrastive: InfoNCE against a queue, else negative cosine.
    """

    hidden: int
    dim: int
    layers: int
    bn: bool
    last_bn: bool
    pred_hidden: int | None
    momentum: tuple[float, float] | None
    symmetric: bool
    contrastive: bool


BASES: dict[str, BaseSpec] = {
    # MoCo v2 (Chen et al., 2020): MLP head 2048-2048-128 without BN, momentum 0.999, asymmetric.
    "moco": BaseSpec(
        hidden=2048,
        dim=128,
        layers=2,
        bn=False,
        last_bn=False,
        pred_hidden=None,
        momentum=(0.999, 0.999),
        symmetric=False,
        contrastive=True,
    ),
    # BYOL (Grill et al., 2020): projector 4096-256 with BN, predictor 4096, EMA 0.99 -> 1 (cosine;
    # the paper starts at 0.996 for ImageNet, 0.99 is our choice for short runs on small data).
    "byol": BaseSpec(
        hidden=4096,
        dim=256,
        layers=2,
        bn=True,
        last_bn=False,
        pred_hidden=4096,
        momentum=(0.99, 1.0),
        symmetric=True,
        contrastive=False,
    ),
    # SimSiam (Chen & He, 2021): 3-layer projector with BN on the output, predictor bottleneck 512.
    "simsiam": BaseSpec(
        hidden=2048,
        dim=2048,
        layers=3,
        bn=True,
        last_bn=True,
        pred_hidden=512,
        momentum=None,
        symmetric=True,
        contrastive=False,
    ),
}


@dataclass
class SiameseOptions(HeadOptions):
    """``objective.name: moco | byol | simsiam`` (and their ``mixmask_`` forms): the heads and the
    target (:class:`HeadOptions`; ``None``: the base's default), MoCo's queue and temperature,
    whether the loss is symmetrised (``None``: the base's default), and the momentum encoder's
    batch-norm splits (shuffle-BN in one process; 1: none)."""

    queue_size: int = 65536
    temperature: float = 0.2
    symmetric: bool | None = None
    key_bn_splits: int = 1


def small_siamese_options() -> SiameseOptions:
    """Small heads and queue, for tests on small images."""
    return SiameseOptions(proj_hidden=64, proj_dim=32, pred_hidden=64, queue_size=256)


class Siamese(GuidanceMixin, nn.Module):
    """Two views through an online network and a target network, on a MoCo v2, BYOL or SimSiam base.

    The query is ``batch.views[0]``, the key ``batch.views[1]`` (put
    ``Views(2, "mocov2")`` or ``Views(2, "byol")`` in the loader). Online:
    backbone (pooled features) -> projector -> predictor (BYOL, SimSiam).
    Target: an :class:`EMATeacher` of backbone + projector (MoCo, BYOL; the
    training loop steps it through :meth:`teachers` after each update) or the
    online projection under stop-gradient (SimSiam). MoCo compares queries
    with their keys against a :class:`KeyQueue` of past keys (InfoNCE); BYOL
    and SimSiam use :func:`negative_cosine` and are symmetric by default.

    A symmetric loss is the mean of its two directions (per sample), for
    every base: SimSiam's ``D(p1, z2) / 2 + D(p2, z1) / 2`` exactly, in
    ``[-1, 1]``. BYOL's paper sums ``2 - 2 cos`` over the two directions,
    which is ``4 + 4`` times ours: the same gradients times 4, which the
    learning rate absorbs (see :mod:`~masklab.objectives.negative_cosine`).
    MoCo's authors' demo sums its symmetric InfoNCE directions; we average them
    too (our choice: one convention; MoCo v2 itself is asymmetric).

    Batch norm. Keys are gathered from every rank before they enter the
    queue. The recipes convert batch norm to ``torch.nn.SyncBatchNorm`` when
    they run on several GPUs (``model.sync_bn``; our choice over MoCo's
    shuffle-BN across GPUs: simpler, and it is what BYOL and MoCo v3 do). In
    one process (and on CPU ranks: SyncBN needs a GPU), ``key_bn_splits``
    stands in for MoCo's shuffle-BN: the key batch is shuffled, the momentum
    encoder runs on that many chunks, so each batch-norm layer normalises a
    key with a random sub-batch, and the keys are put back in order
    (:func:`shuffle_bn`; as the authors' 1-GPU demo does with a
    ``SplitBatchNorm``). The queries are normalised over the whole batch, like
    one large GPU. The shuffle is drawn from the batch's seed, so a resumed run
    draws the same ones. Under SyncBN each rank's chunk is normalised with the
    same-numbered chunks of the other ranks: still a random sub-batch. With
    ``key_bn_splits=1`` a query and its key are normalised with the same
    batch's statistics while the queue's negatives carry earlier batches': a
    signature that tells the positive apart (MoCo's "cheating"). The authors' 1-GPU demo measured what that costs on CIFAR-10,
    4 points of kNN accuracy at 800 epochs: a weaker encoder, not a collapse.
    BYOL and SimSiam have no shuffle-BN in their papers; BYOL may take
    ``key_bn_splits`` too (our choice), SimSiam cannot (its target is the
    online network).

    Args:
        backbone: a :class:`ViTBackbone` or :class:`CNNBackbone` (its pooled features are used).
        base: ``"moco"``, ``"byol"`` or ``"simsiam"``.
        hidden: projector hidden width (default: the base's).
        dim: projector output width (default: the base's).
        pred_hidden: predictor hidden width (BYOL, SimSiam; default: the base's).
        queue_size: MoCo's number of negative keys.
        temperature: MoCo's InfoNCE temperature.
        momentum: the target's EMA decay at the start (default: the base's).
        momentum_final: the decay at the end, cosine in between (default: the base's; MoCo keeps it constant).
        symmetric: add the loss with the views swapped (default: the base's); the two directions are averaged.
        key_bn_splits: chunks the momentum encoder runs the shuffled key batch in (shuffle-BN in one
            process; 1: the whole batch at once). Not for SimSiam. Every chunk needs two samples.

    Examples:
        >>> import torch
        >>> from masklab.objectives import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> model = Siamese(build_backbone("resnet18"), "moco", hidden=32, dim=16, queue_size=64)
        >>> views = [torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)]
        >>> out = model(Batch(images=views[0], views=views))
        >>> out.loss.ndim, int(model.queue.ptr)
        (0, 4)
    """

    prefix = ""
    """Before the base's name in the objective's name (``mixmask_moco``)."""

    def __init__(
        self,
        backbone: ViTBackbone | CNNBackbone,
        base: str = "moco",
        hidden: int | None = None,
        dim: int | None = None,
        pred_hidden: int | None = None,
        queue_size: int = 65536,
        temperature: float = 0.2,
        momentum: float | None = None,
        momentum_final: float | None = None,
        symmetric: bool | None = None,
        key_bn_splits: int = 1,
    ) -> None:
        super().__init__()
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}; choose one of {sorted(BASES)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        spec = BASES[base]
        if isinstance(key_bn_splits, bool) or not isinstance(key_bn_splits, int) or key_bn_splits < 1:
            raise ValueError(f"key_bn_splits must be a positive integer, got {key_bn_splits!r}")
        if key_bn_splits > 1 and spec.momentum is None:
            raise ValueError(
                f"key_bn_splits={key_bn_splits} shuffles the momentum encoder's batch, but {base!r} has no momentum "
                "encoder; use 1"
            )
        self.key_bn_splits = key_bn_splits
        self.name = f"{self.prefix}{base}"
        check_family(self.name, backbone)
        self.base, self.temperature = base, float(temperature)
        self.symmetric = spec.symmetric if symmetric is None else bool(symmetric)
        self.backbone = backbone
        dim = spec.dim if dim is None else dim
        self.projector = projection_mlp(
            backbone.embed_dim, spec.hidden if hidden is None else hidden, dim, spec.layers, spec.bn, spec.last_bn
        )
        if spec.pred_hidden is None:
            self.predictor: nn.Module = nn.Identity()
        else:
            self.predictor = predictor_mlp(dim, spec.pred_hidden if pred_hidden is None else pred_hidden)
        self.momentum: EMATeacher | None = None
        if spec.momentum is not None:
            start = spec.momentum[0] if momentum is None else momentum
            end = (start if base == "moco" else spec.momentum[1]) if momentum_final is None else momentum_final
            self.momentum = EMATeacher(self._student(), base=start, final=end)
        self.queue = KeyQueue(queue_size, dim) if spec.contrastive else None

    @classmethod
    def from_options(cls, backbone: ViTBackbone | CNNBackbone, options: SiameseOptions, mask: MaskOptions) -> Siamese:
        """The base is the objective's name without :attr:`prefix`."""
        symmetric = {} if options.symmetric is None else {"symmetric": options.symmetric}
        return cls(
            backbone,
            options.name.removeprefix(cls.prefix),
            queue_size=options.queue_size,
            temperature=options.temperature,
            key_bn_splits=options.key_bn_splits,
            **options.heads(),
            **symmetric,
        )

    def _student(self) -> nn.Sequential:
        # A view over the online modules (no copy): what the EMA teacher follows.
        return nn.Sequential(self.backbone, self.projector)

    def teachers(self) -> list[tuple[EMATeacher, nn.Module]]:
        """``(teacher, student)`` pairs the training loop steps after each update."""
        return [] if self.momentum is None else [(self.momentum, self._student())]

    def online(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, projection)`` of the online network: ``(B, dim)`` each (the same for MoCo)."""
        z = self.projector(self.backbone(images))
        return self.predictor(z), z

    @torch.no_grad()
    def key(
        self,
        images: torch.Tensor,
        projection: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        order: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The target embedding ``(B, dim)``: the EMA teacher's, or the online ``projection`` stopped.

        With ``key_bn_splits > 1`` the teacher runs on shuffled chunks (:func:`shuffle_bn`); the
        shuffle is ``order`` if given, else drawn from ``generator`` on the images' device.
        """
        if self.momentum is not None:
            if self.key_bn_splits == 1:
                return self.momentum(images)
            if order is None:
                order = torch.randperm(images.shape[0], generator=generator, device=images.device)
            return shuffle_bn(self.momentum, images, order, self.key_bn_splits)
        if projection is not None:
            return projection.detach()
        return self.projector(self.backbone(images))

    def pair_loss(self) -> PairLoss:
        """The base's per-sample loss ``base(q, k) -> (B,)`` (InfoNCE against the current queue, or -cos)."""
        if self.queue is None:
            return partial(negative_cosine, reduction="none")
        # A copy: the queue is updated in place after the loss, before backward.
        return partial(infonce_loss, queue=self.queue.keys.clone(), temperature=self.temperature, reduction="none")

    def extra_terms(self, batch: Batch, base: PairLoss, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """Further per-sample losses ``(B,)`` on top of ``base(q, k)``; none here (MixMask adds its own)."""
        return None

    def forward(self, batch: Batch) -> ObjectiveOutput:
        x_q, x_k = two_views(batch, type(self).__name__)  # the query view, the key view
        base = self.pair_loss()
        shuffle = batch_generator(batch, _KEY_SHUFFLE_SALT) if self.key_bn_splits > 1 else None
        q, z_q = self.online(x_q)
        want_z_k = self.symmetric and self.momentum is None
        q_k, z_k = self.online(x_k) if want_z_k else (None, None)
        k = self.key(x_k, z_k, generator=shuffle)
        plain = base(q, k)
        keys = [k]
        if self.symmetric:
            if q_k is None:
                q_k, _ = self.online(x_k)
            k_q = self.key(x_q, z_q, generator=shuffle)
            plain = (plain + base(q_k, k_q)) / 2  # the mean of the two directions (see the class docstring)
            keys.append(k_q)
        logs = {"plain": plain.detach().mean()}
        per_sample = plain
        extra = self.extra_terms(batch, base, q, k)
        if extra is not None:
            logs["mixed"] = extra.detach().mean()
            per_sample = per_sample + extra
        loss = per_sample.mean()
        if self.queue is not None:
            self.queue.push(torch.cat(keys))
        logs["loss"] = loss.detach()
        return ObjectiveOutput(loss, logs)

    def extra_repr(self) -> str:
        queue = "" if self.queue is None else f", queue_size={self.queue.size}, temperature={self.temperature}"
        splits = "" if self.key_bn_splits == 1 else f", key_bn_splits={self.key_bn_splits}"
        return f"base={self.base!r}, symmetric={self.symmetric}{queue}{splits}"


for _base in BASES:
    register_objective(_base, options=SiameseOptions, takes=None, views=2, small=small_siamese_options)(Siamese)
