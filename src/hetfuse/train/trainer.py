"""SGD training (optionally with augmentation, a one-cycle schedule, label smoothing) and evaluation
helpers (single models and probability-averaging ensembles)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.augment import random_crop_flip
from ..errors import HetfuseError
from .memory_format import use_channels_last


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _augment_seed(seed: int) -> int:
    """Seed of the augmentation generator: derived from ``seed`` but distinct from the shuffling stream."""
    return (int(seed) * 1_000_003 + 0x5DEECE66D) % (2 ** 63 - 1)


SCHEDULES = ("constant", "onecycle", "warmup-linear")

# The training recipe of ZipIt! and the heterogeneous-merging paper (SGD, momentum 0.9, weight decay 5e-4, peak
# learning rate 0.4 after a linear warm-up, then linear decay to 0, per iteration; random crop + flip).
ZIPIT_RECIPE = {"lr": 0.4, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "batch_size": 500,
                "schedule": "warmup-linear", "label_smoothing": 0.0, "augment": True}


def _warmup_linear(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, lr: float = 0.01,
                momentum: float = 0.5, batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0,
                progress: bool = True, desc: str = "train", augment: bool = False, schedule: str = "constant",
                label_smoothing: float = 0.0, nesterov: bool = False, channels_last: bool = False,
                max_batches: int | None = None, record_time: bool = False, head=None,
                warmup_epochs: float | None = None) -> list[dict]:
    """Train ``model`` (already initialised) with SGD + cross-entropy; returns per-epoch statistics.

    Batches are shuffled with a ``torch.Generator`` seeded by ``seed``. The model trains in train
    mode (batch norm uses batch statistics) and ends in eval mode. Each history entry holds
    ``epoch``, ``loss`` (mean training loss, label-smoothed if ``label_smoothing``) and ``train_acc``
    (percent, on the augmented batches if ``augment``).

    Options (the defaults reproduce plain SGD at a constant learning rate):

    * ``augment``: random crop (zero padding 4) + horizontal flip of every batch of images
      (:func:`hetfuse.data.random_crop_flip`) drawn from a second generator derived from ``seed``.
    * ``schedule``: ``"constant"``, ``"onecycle"`` (``torch.optim.lr_scheduler.OneCycleLR`` with
      ``max_lr=lr`` over all the run's batches, stepped after every batch; the momentum stays at
      ``momentum``, it is not cycled) or ``"warmup-linear"`` (linear warm-up to ``lr`` over ``warmup_epochs``,
      default 5% of the run and at least one batch, then linear decay to 0, per batch).
    * ``head``: an :class:`~hetfuse.train.heads.OutputHead`; the loss is cross-entropy of its ``train_logits``
      (an embed head: scale × cosine over the model's own classes).
    * ``label_smoothing``: passed to ``F.cross_entropy``.
    * ``nesterov``: Nesterov momentum (needs ``momentum > 0``).
    * ``channels_last``: model and 4-D batches in ``torch.channels_last`` memory format, where that is safe on
      this processor (:mod:`hetfuse.train.memory_format`; elsewhere ignored, with one warning).
    * ``max_batches``: stop after this many optimiser steps in all (for timing); the statistics of
      the last, partial epoch cover the examples it saw. The schedule still spans the full run.
    * ``record_time``: add ``seconds`` (wall time of the epoch's batches), ``batches`` and ``lr``
      (learning rate of the epoch's last batch) to every history entry.

    For batch-norm models a final batch of a single example is skipped (batch statistics of one
    example are undefined).
    """
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
    y = y.long()
    if head is not None:
        y = head.train_targets(y)
    channels_last = use_channels_last(channels_last, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov)
    gen = torch.Generator().manual_seed(int(seed))
    aug_gen = torch.Generator().manual_seed(_augment_seed(seed)) if augment else None
    n = x.shape[0]
    n_batches = math.ceil(n / batch_size)
    if _has_batchnorm(model) and n_batches > 1 and n % batch_size == 1:
        n_batches -= 1  # a batch of one example breaks batch norm in train mode
    n_seen = min(n, n_batches * batch_size)
    total_steps = epochs * n_batches
    sched = None
    if schedule == "onecycle" and total_steps > 0:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, cycle_momentum=False)
    elif schedule == "warmup-linear" and total_steps > 0:
        w = 0.05 * epochs if warmup_epochs is None else warmup_epochs
        warm = max(1, min(total_steps, int(round(w * n_batches))))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_linear(total_steps, warm))
    budget = total_steps if max_batches is None else min(total_steps, int(max_batches))
    steps = 0
    history: list[dict] = []
    bar = tqdm(total=budget, desc=desc, disable=not progress, leave=False)
    try:
        for epoch in range(1, epochs + 1):
            if steps >= budget:
                break
            model.train()
            perm = torch.randperm(n, generator=gen)
            total_loss, correct, seen, done = 0.0, 0, 0, 0
            last_lr = float(opt.param_groups[0]["lr"])
            t0 = time.perf_counter()
            for b in range(n_batches):
                if steps >= budget:
                    break
                idx = perm[b * batch_size:(b + 1) * batch_size]
                xb, yb = x[idx], y[idx]
                if aug_gen is not None:
                    xb = random_crop_flip(xb, padding=4, flip=True, generator=aug_gen)
                if channels_last and xb.ndim == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                opt.zero_grad(set_to_none=True)
                out = model(xb)
                if head is not None:
                    out = head.train_logits(out)
                loss = F.cross_entropy(out, yb, label_smoothing=label_smoothing)
                loss.backward()
                last_lr = float(opt.param_groups[0]["lr"])
                opt.step()
                if sched is not None:
                    sched.step()
                steps += 1
                done += 1
                seen += idx.numel()
                total_loss += float(loss.detach()) * idx.numel()
                correct += int((out.detach().argmax(dim=1) == yb).sum())
                bar.update(1)
            seconds = time.perf_counter() - t0
            denom = seen if done < n_batches else n_seen
            stats = {"epoch": epoch, "loss": total_loss / denom, "train_acc": 100.0 * correct / denom}
            if record_time:
                stats.update(seconds=seconds, batches=done, lr=last_lr)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['train_acc']:.2f}")
            history.append(stats)
    finally:
        bar.close()
        model.eval()
    return history


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
        p = w * (class_scores(out) if out.dim() == 3 else torch.softmax(out, dim=1))
        probs = p if probs is None else probs + p
    pred = probs.argmax(dim=1)
    return 100.0 * float((pred == y.long()).float().mean())
