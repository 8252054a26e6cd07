"""Output heads and the class-split (multi-task) evaluation protocol.

* ``linear`` head (the default): the model's last Linear gives one logit per class of the data set.
* ``embed`` head: the last Linear gives a ``dim``-dimensional vector, scored against fixed unit class
  embeddings by ``scale`` × cosine (scale 100, fixed). A model trained on some classes learns with
  cross-entropy over *its own* classes only; models trained on different classes then still live in one
  output space and can be merged. The papers use CLIP text embeddings of "a photo of a {class}", which cannot
  be computed offline here: :func:`class_embeddings` is a fixed, seeded substitute (one standard-normal vector
  per class, normalised), recorded in every checkpoint's metadata.

Metrics for tasks (disjoint groups of classes): *joint* accuracy is the argmax over every class of the data set;
a task's accuracy is the argmax over that task's classes, on that task's test images; *per-task avg* is their
mean. A multi-head network (outputs ``(batch, heads, ...)``: an ensemble of task models, a partially zipped
network) scores each class only with the head of the model that was trained on it: each head's scores go through
a softmax over its own classes, joint = the argmax of these probabilities across heads, a task's accuracy uses
the head trained on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..errors import HetfuseError

EMBED_DIM = 512
EMBED_SCALE = 100.0


def class_embeddings(num_classes: int, dim: int = EMBED_DIM, seed: int = 0) -> torch.Tensor:
    """The fixed class embeddings: row c = a standard-normal vector drawn from ``torch.Generator`` seeded with
    ``seed`` (rows in class order), normalised to unit length. ``num_classes x dim``, float32."""
    g = torch.Generator().manual_seed(int(seed))
    e = torch.randn(int(num_classes), int(dim), generator=g)
    return F.normalize(e, dim=1)


@dataclass
class OutputHead:
    """How a model's outputs become class scores; stored in checkpoint metadata (``to_dict``)."""

    kind: str = "linear"
    num_classes: int = 10
    classes: list[int] | None = None  # the classes the model was trained on (None: all)
    dim: int = EMBED_DIM
    seed: int = 0
    scale: float = EMBED_SCALE
    _emb: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "embed"):
            raise HetfuseError(f"unknown head {self.kind!r}; known: linear, embed")
        if self.classes is not None:
            self.classes = [int(c) for c in self.classes]
            if len(set(self.classes)) != len(self.classes) or not self.classes:
                raise HetfuseError(f"classes {self.classes} must be distinct and non-empty")
            bad = [c for c in self.classes if not 0 <= c < self.num_classes]
            if bad:
                raise HetfuseError(f"classes {bad} are not classes of a {self.num_classes}-class data set")

    @property
    def outputs(self) -> int:
        """The width of the model's last layer."""
        return self.dim if self.kind == "embed" else self.num_classes

    def embeddings(self, device=None) -> torch.Tensor:
        if self._emb is None:
            self._emb = class_embeddings(self.num_classes, self.dim, self.seed)
        return self._emb.to(device) if device is not None else self._emb

    def scores(self, out: torch.Tensor) -> torch.Tensor:
        """Scores over every class of the data set: the logits, or ``scale`` × cosine to each class embedding."""
        if self.kind == "linear":
            return out
        return self.scale * F.normalize(out, dim=-1) @ self.embeddings(out.device).T

    def train_logits(self, out: torch.Tensor) -> torch.Tensor:
        """The logits training uses: a linear head's every logit; an embed head's scores over its own classes."""
        if self.kind == "linear" or self.classes is None:
            return self.scores(out)
        return self.scores(out)[:, self.classes]

    def train_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Labels as ``train_logits`` indexes them (an embed head's: position among its own classes)."""
        if self.kind == "linear" or self.classes is None:
            return y
        lookup = torch.full((self.num_classes,), -1, dtype=torch.long)
        lookup[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        out = lookup[y.long()]
        if bool((out < 0).any()):
            raise HetfuseError("training labels outside the head's classes")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_emb", None)
        return d

    @classmethod
    def from_dict(cls, d: dict | None, num_classes: int) -> OutputHead:
        if not d:
            return cls("linear", num_classes)
        d = dict(d)
        d.pop("_emb", None)
        return cls(**d)


def parse_classes(text: str | None) -> list[int] | None:
    """``"6,7,3,0,5"`` -> ``[6, 7, 3, 0, 5]`` (None for None)."""
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise HetfuseError(f"classes must be comma-separated integers, got {text!r}") from None


def parse_tasks(text: str) -> list[list[int]]:
    """``"6,7,3,0,5/2,8,4,9,1"`` -> two tasks; tasks must be disjoint."""
    tasks = [parse_classes(t) for t in text.split("/")]
    flat = [c for t in tasks for c in t]
    if len(tasks) < 1 or any(not t for t in tasks):
        raise HetfuseError(f"--tasks {text!r}: give tasks as comma-separated classes separated by '/'")
    if len(set(flat)) != len(flat):
        raise HetfuseError(f"--tasks {text!r}: tasks must be disjoint")
    return tasks


def head_probabilities(scores: torch.Tensor, classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """A head's softmax over its own classes, placed into a ``(batch, num_classes)`` tensor (0 elsewhere)."""
    p = torch.zeros(scores.shape[0], num_classes, dtype=scores.dtype, device=scores.device)
    idx = torch.tensor(list(classes), device=scores.device)
    p[:, idx] = torch.softmax(scores[:, idx], dim=1)
    return p


def task_metrics(scores: torch.Tensor | None, y: torch.Tensor, tasks: Sequence[Sequence[int]], *,
                 head_scores: Sequence[torch.Tensor] | None = None,
                 head_classes: Sequence[Sequence[int]] | None = None) -> dict:
    """Joint accuracy, each task's accuracy and their mean (percent), for a single-head model's ``scores``
    ``(batch, classes)`` or a multi-head network's per-head ``head_scores`` with the classes each head was trained
    on (see the module docstring)."""
    y = y.long()
    if head_scores is None:
        if scores is None:
            raise HetfuseError("task_metrics needs scores or head_scores")
        joint = scores.argmax(1)
        task_acc = []
        for t in tasks:
            sel = torch.isin(y, torch.tensor(list(t)))
            idx = torch.tensor(list(t))
            pred = idx[scores[sel][:, idx].argmax(1)]
            task_acc.append(100.0 * float((pred == y[sel]).float().mean()) if bool(sel.any()) else float("nan"))
    else:
        if head_classes is None or len(head_classes) != len(head_scores):
            raise HetfuseError("a multi-head network needs the classes of each head")
        n = head_scores[0].shape[1]
        probs = torch.stack([head_probabilities(s, c, n) for s, c in zip(head_scores, head_classes, strict=False)])
        joint = probs.max(0).values.argmax(1)
        task_acc = []
        for t in tasks:
            sel = torch.isin(y, torch.tensor(list(t)))
            owner = next((k for k, c in enumerate(head_classes) if set(t) <= set(c)), None)
            if owner is None:
                raise HetfuseError(f"no head was trained on task {list(t)} (heads: {[list(c) for c in head_classes]})")
            idx = torch.tensor(list(t))
            pred = idx[head_scores[owner][sel][:, idx].argmax(1)]
            task_acc.append(100.0 * float((pred == y[sel]).float().mean()) if bool(sel.any()) else float("nan"))
    return {"joint": 100.0 * float((joint == y).float().mean()), "tasks": task_acc,
            "per_task_avg": float(sum(task_acc) / len(task_acc))}


def model_task_metrics(model, head: OutputHead, x: torch.Tensor, y: torch.Tensor, tasks: Sequence[Sequence[int]],
                       head_classes: Sequence[Sequence[int]] | None = None) -> dict:
    """:func:`task_metrics` of one model (a multi-head network: its heads trained on ``head_classes``)."""
    from .trainer import predict_logits

    out = predict_logits(model, x)
    if out.dim() == 3:
        if head_classes is None:
            raise HetfuseError("a multi-head network needs the classes each of its heads was trained on")
        return task_metrics(None, y, tasks, head_scores=[head.scores(out[:, k]) for k in range(out.shape[1])],
                            head_classes=head_classes)
    return task_metrics(head.scores(out), y, tasks)


def ensemble_task_metrics(models, heads: Sequence[OutputHead], x: torch.Tensor, y: torch.Tensor,
                          tasks: Sequence[Sequence[int]],
                          head_classes: Sequence[Sequence[Sequence[int]] | None] | None = None) -> dict:
    """:func:`task_metrics` of the ensemble of task models: each model a head over the classes it was trained on
    (a multi-head network contributes each of its heads, over ``head_classes[i]``)."""
    from .trainer import predict_logits

    scores, classes = [], []
    for i, (m, h) in enumerate(zip(models, heads, strict=False)):
        out = predict_logits(m, x)
        if out.dim() == 3:
            per = (head_classes or [None] * len(models))[i]
            if per is None:
                raise HetfuseError("a multi-head network needs the classes each of its heads was trained on")
            scores += [h.scores(out[:, k]) for k in range(out.shape[1])]
            classes += [list(c) for c in per]
        else:
            scores.append(h.scores(out))
            classes.append(h.classes if h.classes is not None else list(range(h.num_classes)))
    return task_metrics(None, y, tasks, head_scores=scores, head_classes=classes)
