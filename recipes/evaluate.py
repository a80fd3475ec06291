"""Evaluation on frozen features: kNN and a linear probe."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from masklab.pipeline import Batch

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "linear_probe_accuracy"]


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch], gather: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D), labels (N,))`` of every batch, on the CPU, in loader order.

    ``gather``: each process encodes its shard of a sharded loader and ``gather((features, labels,
    index))`` collects every process's batch (Accelerate's ``gather``); the result is then every
    dataset image once, in index order (a shard padded with repeats counts each image once).

    Raises:
        ValueError: a batch without labels (kNN and the linear probe need a labelled set).
    """
    feats, labels, index = [], [], []
    for batch in batches:
        if batch.labels is None or bool((batch.labels < 0).any()):
            raise ValueError(
                "kNN and linear evaluation need labelled images, and this data has none (label -1): "
                "give labelled data for the evaluation (eval --data/--test, or data.train/data.test)"
            )
        part = (encode(batch.images).float(), batch.labels, batch.index)
        if gather is not None:
            part = gather(part)
        feats.append(part[0].cpu())
        labels.append(part[1].cpu())
        if part[2] is not None:
            index.append(part[2].cpu())
    feats, labels = torch.cat(feats), torch.cat(labels)
    if gather is not None and index:
        index = torch.cat(index)
        order = torch.argsort(index, stable=True)
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = index[order][1:] != index[order][:-1]
        feats, labels = feats[order][first], labels[order][first]
    return feats, labels


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN on cosine similarity (Wu et al., 2018, as DINO evaluates).

    Each of the ``k`` nearest training samples votes for its class with
    weight ``exp(similarity / temperature)``; the class with most weight wins.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], chunk):
        query = F.normalize(test_features[start : start + chunk].float(), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of :func:`knn_predict`, in [0, 1]."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    preds = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return float((preds == test_labels).float().mean())


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    lr: float = 0.01,
    seed: int = 0,
) -> float:
    """Train a linear classifier on standardised frozen features (full-batch AdamW), return test accuracy."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0).clamp(min=1e-6)
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = torch.nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(head(x_train), train_labels).backward()
        optimizer.step()
    with torch.no_grad():
        return float((head(x_test).argmax(1) == test_labels).float().mean())
