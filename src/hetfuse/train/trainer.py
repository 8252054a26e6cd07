"""Plain SGD training and evaluation helpers (single models and probability-averaging ensembles)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import HetfuseError


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, lr: float = 0.01,
                momentum: float = 0.5, batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0,
                progress: bool = True, desc: str = "train") -> list[dict]:
    """Train ``model`` (already initialised) with SGD + cross-entropy; returns per-epoch statistics.

    Batches are shuffled with a ``torch.Generator`` seeded by ``seed``. The model ends in eval mode.
    """
    if x.shape[0] != y.shape[0]:
        raise HetfuseError(f"train_model: {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise HetfuseError("train_model: empty training set")
    if epochs < 0 or batch_size <= 0:
        raise HetfuseError(f"train_model: need epochs >= 0 and batch_size > 0, got {epochs}, {batch_size}")
    y = y.long()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    n_batches = math.ceil(n / batch_size)
    history: list[dict] = []
    bar = tqdm(total=epochs * n_batches, desc=desc, disable=not progress, leave=False)
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(n, generator=gen)
            total_loss, correct = 0.0, 0
            for b in range(n_batches):
                idx = perm[b * batch_size:(b + 1) * batch_size]
                xb, yb = x[idx], y[idx]
                opt.zero_grad(set_to_none=True)
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * idx.numel()
                correct += int((out.detach().argmax(dim=1) == yb).sum())
                bar.update(1)
            stats = {"epoch": epoch, "loss": total_loss / n, "train_acc": 100.0 * correct / n}
            bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['train_acc']:.2f}")
            history.append(stats)
    finally:
        bar.close()
        model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The model's outputs on ``x``, computed in eval mode without gradients, batch by batch."""
    model.eval()
    if x.shape[0] == 0:
        raise HetfuseError("predict_logits: no inputs")
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)], dim=0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    if x.shape[0] != y.shape[0]:
        raise HetfuseError(f"accuracy: {x.shape[0]} inputs but {y.shape[0]} labels")
    pred = predict_logits(model, x, batch_size).argmax(dim=1)
    return 100.0 * float((pred == y.long()).float().mean())


def ensemble_accuracy(models: Sequence[nn.Module], weights: Sequence[float], x: torch.Tensor,
                      y: torch.Tensor) -> float:
    """Accuracy (percent) of the ``weights``-weighted average of the models' softmax probabilities."""
    models = list(models)
    weights = [float(w) for w in weights]
    if not models:
        raise HetfuseError("ensemble_accuracy: no models")
    if len(models) != len(weights):
        raise HetfuseError(f"ensemble_accuracy: {len(models)} models but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise HetfuseError(f"ensemble_accuracy: weights must be non-negative, got {weights}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise HetfuseError(f"ensemble_accuracy: weights must sum to 1, got {weights} (sum {sum(weights)})")
    if x.shape[0] != y.shape[0]:
        raise HetfuseError(f"ensemble_accuracy: {x.shape[0]} inputs but {y.shape[0]} labels")
    probs = None
    for m, w in zip(models, weights):
        p = w * torch.softmax(predict_logits(m, x), dim=1)
        probs = p if probs is None else probs + p
    pred = probs.argmax(dim=1)
    return 100.0 * float((pred == y.long()).float().mean())
