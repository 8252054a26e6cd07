"""Training a model on all of its data (the one loop of :mod:`hetfuse.train.fitting` with nothing held out) and
evaluation helpers (single models and probability-averaging ensembles)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import HetfuseError


# The training recipe of ZipIt! and the heterogeneous-merging paper (SGD, momentum 0.9, weight decay 5e-4, peak
# learning rate 0.4 after a linear warm-up, then linear decay to 0, per iteration; random crop + flip).
ZIPIT_RECIPE = {"lr": 0.4, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "batch_size": 500,
                "schedule": "warmup-linear", "label_smoothing": 0.0, "augment": True}


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, lr: float = 0.01,
                momentum: float = 0.5, batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0,
                progress: bool = True, desc: str = "train", augment: bool = False, schedule: str = "constant",
                label_smoothing: float = 0.0, nesterov: bool = False, channels_last: bool = False,
                max_batches: int | None = None, record_time: bool = False, head=None,
                warmup_epochs: float | None = None) -> list[dict]:
    """Train ``model`` (already initialised) with SGD + cross-entropy on all of ``(x, y)``; returns per-epoch
    statistics. The one training loop of hetfuse (:func:`hetfuse.train.fit`) with nothing held out, every batch
    used (the last one may be smaller) and the last epoch kept.

    Batches are shuffled with a generator seeded by ``seed`` and the epoch. The model trains in train mode (batch
    norm uses batch statistics) and ends in eval mode. Each history entry holds ``epoch``, ``loss`` (mean training
    loss, label-smoothed if ``label_smoothing``) and ``train_acc`` (percent, on the augmented batches if
    ``augment``).

    Options (the defaults reproduce plain SGD at a constant learning rate):

    * ``augment``: random crop (zero padding 4) + horizontal flip of every batch of images, drawn from a
      generator seeded by ``seed`` and the epoch.
    * ``schedule``: one of :data:`hetfuse.train.fitting.SCHEDULES` (closed forms per batch, see
      :func:`hetfuse.train.lr_at`): ``"constant"``, ``"onecycle"`` (linear rise to ``lr`` over 30% of the run,
      cosine decay to ``lr``/1e4), ``"warmup-linear"`` (linear warm-up to ``lr`` over ``warmup_epochs``, default
      5% of the run and at least one batch, then linear decay to 0), ``"cosine"``, ``"step"``.
    * ``head``: an :class:`~hetfuse.train.heads.OutputHead`; the loss is cross-entropy of its ``train_logits``
      (an embed head: scale × cosine over the model's own classes).
    * ``label_smoothing``: passed to ``F.cross_entropy``.
    * ``nesterov``: Nesterov momentum (needs ``momentum > 0``).
    * ``channels_last``: model and 4-D batches in ``torch.channels_last`` memory format, where that is safe on
      this processor (:mod:`hetfuse.train.memory_format`; elsewhere ignored, with one warning).
    * ``max_batches``: stop after this many optimiser steps in all (for timing); the statistics of the last,
      partial epoch cover the examples it saw. The schedule still spans the full run.
    * ``record_time``: add ``seconds`` (wall time of the epoch), ``batches`` and ``lr`` (learning rate of the
      epoch's last batch) to every history entry.

    For batch-norm models a final batch of a single example is skipped (batch statistics of one example are
    undefined).
    """
    from .fitting import SCHEDULES, FitSettings, fit

    if x.shape[0] != y.shape[0]:
        raise HetfuseError(f"train_model: {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise HetfuseError("train_model: empty training set")
    if epochs < 0 or batch_size <= 0:
        raise HetfuseError(f"train_model: need epochs >= 0 and batch_size > 0, got {epochs}, {batch_size}")
    if schedule not in SCHEDULES:
        raise HetfuseError(f"train_model: unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise HetfuseError(f"train_model: label_smoothing must lie in [0, 1), got {label_smoothing}")
    if nesterov and momentum <= 0:
        raise HetfuseError(f"train_model: nesterov momentum needs momentum > 0, got {momentum}")
    if max_batches is not None and max_batches < 0:
        raise HetfuseError(f"train_model: max_batches must be non-negative, got {max_batches}")
    if augment and x.ndim != 4:
        raise HetfuseError(f"train_model: augment needs N x C x H x W images, got shape {tuple(x.shape)}")
    if epochs == 0:
        model.eval()
        return []
    settings = FitSettings(epochs=epochs, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                           batch_size=batch_size, schedule=schedule, label_smoothing=label_smoothing, augment=augment,
                           seed=seed, val_fraction=0.0, channels_last=channels_last, warmup_epochs=warmup_epochs,
                           drop_last=False, max_steps=max_batches)
    result = fit(model, x, y.long(), settings, head=head, progress=progress, resume=False, desc=desc)
    keys = ("epoch", "loss", "train_acc") + (("seconds", "batches", "lr") if record_time else ())
    return [{k: h[k] for k in keys} for h in result.history]


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The model's outputs on ``x``, computed in eval mode without gradients, batch by batch (each batch moved to
    the model's device; the outputs are on ``x``'s device)."""
    model.eval()
    if x.shape[0] == 0:
        raise HetfuseError("predict_logits: no inputs")
    p = next(model.parameters(), None)
    dev = x.device if p is None else p.device
    return torch.cat([model(x[i:i + batch_size].to(dev)).to(x.device) for i in range(0, x.shape[0], batch_size)],
                     dim=0)


def class_scores(outputs: torch.Tensor) -> torch.Tensor:
    """Per-class scores of a model's outputs: the outputs themselves, or for a multi-head network (outputs
    ``(batch, heads, classes)``) the average of the heads' softmax probabilities."""
    if outputs.dim() == 3:
        return torch.softmax(outputs, dim=-1).mean(dim=1)
    return outputs


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent (a multi-head network: see :func:`class_scores`)."""
    if x.shape[0] != y.shape[0]:
        raise HetfuseError(f"accuracy: {x.shape[0]} inputs but {y.shape[0]} labels")
    pred = class_scores(predict_logits(model, x, batch_size)).argmax(dim=1)
    return 100.0 * float((pred == y.long()).float().mean())


def class_probabilities(outputs: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities of a model's outputs, as an ensemble averages them: the softmax of the outputs, or
    for a multi-head network its heads' mean probabilities (:func:`class_scores`)."""
    return class_scores(outputs) if outputs.dim() == 3 else torch.softmax(outputs, dim=1)


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
    for m, w in zip(models, weights, strict=False):
        out = predict_logits(m, x)
        p = w * class_probabilities(out)
        probs = p if probs is None else probs + p
    pred = probs.argmax(dim=1)
    return 100.0 * float((pred == y.long()).float().mean())
