"""Loss barriers: loss and error along the straight line between two networks' weights.

For two networks θ_0 and θ_1 (of any depths: the deeper one's depth is matched by balancing, as in a fusion), the
path is θ_t = (1 − t) θ_0 + t θ_1 between the *aligned, balanced* pair: :func:`hetfuse.prepare_fusion` with the
chosen matcher (``align``; ``"none"``: every neuron with the one of the same index, vanilla averaging) and no
repair, then ``PreparedFusion.combine([1 − t, t], repair=False)`` for every t of ``linspace(0, 1, points)``. On
labelled data each point's loss (mean cross-entropy) and error (1 − accuracy, a fraction) are measured, and the
barriers as Frankle et al. (2020) define them:

    loss barrier  = max_t  L(θ_t) − ((1 − t) L(θ_0) + t L(θ_1))      (the same for the error)

with the t where the maximum is reached (the first such t). The endpoints θ_0, θ_1 are the aligned networks; where
the alignment moves a network exactly (a permutation, identity layers added to balance the depth) their loss is the
network's own, which :class:`BarrierResult` reports beside them (``model_loss``, ``model_error``) to show it.

``import hetfuse; hetfuse.barrier(a, b, data)`` calls :func:`barrier` (this module is ``hetfuse.barriers``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError, HetfuseError, UnsupportedModelError


@dataclass
class BarrierResult:
    """The curve and its barriers. ``ts``: the interpolation weights (t = 0 is the first model, t = 1 the second);
    ``loss``, ``error``: mean cross-entropy and error (fraction in [0, 1]) at each t; ``loss_barrier``,
    ``error_barrier``: Frankle et al.'s barriers (≥ 0), reached at ``t_loss``, ``t_error``; ``model_loss``,
    ``model_error``: each input network's own loss and error on the same data (before alignment); ``match``: the
    matcher that aligned the pair; ``examples``: how many labelled examples were scored; ``fusion``: what the
    alignment did (from :func:`hetfuse.prepare_fusion`'s report: ``methods``, ``target``, ``depths_in``,
    ``widths_in``, ``balanced_widths``, ``fused_widths``, ``mappings`` (0-based), ``notes``)."""

    ts: list[float]
    loss: list[float]
    error: list[float]
    loss_barrier: float
    error_barrier: float
    t_loss: float
    t_error: float
    model_loss: list[float]
    model_error: list[float]
    match: str = ""
    examples: int = 0
    fusion: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able: every field."""
        return asdict(self)


def barrier_of(ts, values) -> tuple[float, float]:
    """Frankle et al.'s barrier of a curve: max over t of ``values(t)`` − the straight line between its endpoints,
    and the (first) t where it is reached."""
    v0, v1 = float(values[0]), float(values[-1])
    gaps = [float(v) - ((1.0 - float(t)) * v0 + float(t) * v1) for t, v in zip(ts, values, strict=True)]
    k = max(range(len(gaps)), key=lambda i: (gaps[i], -i))
    return gaps[k], float(ts[k])


def _labelled(data) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(inputs, labels, default alignment inputs) of ``data``: a hetfuse ``Dataset`` (its test split; alignment
    inputs from its training split), an ``(inputs, labels)`` pair, or an iterable of ``(inputs, labels)`` batches."""
    if hasattr(data, "x_test") and hasattr(data, "y_test"):
        return data.x_test, data.y_test, getattr(data, "x_train", data.x_test)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, Iterable) and not isinstance(data, torch.Tensor):
        xs, ys = [], []
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
                    and isinstance(batch[1], torch.Tensor)):
                raise DataError("every batch of the data must be (inputs, labels)")
            xs.append(batch[0])
            ys.append(batch[1])
        if not xs:
            raise DataError("the data gave no batches")
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise DataError(f"data must be (inputs, labels), an iterable of (inputs, labels) batches or a "
                        f"hetfuse Dataset, got {type(data).__name__}")
    if x.shape[0] != y.reshape(-1).shape[0] or x.shape[0] == 0:
        raise DataError(f"{x.shape[0]} inputs but {y.reshape(-1).shape[0]} labels")
    if y.is_floating_point() or y.dim() != 1:
        raise DataError("labels must be a vector of integer class indices")
    return x, y, x


@torch.no_grad()
def _scores(model: nn.Module, x: torch.Tensor, head, batch_size: int) -> torch.Tensor:
    from .train import predict_logits

    out = predict_logits(model, x, batch_size)
    if out.dim() != 2:
        raise HetfuseError(f"a network gives outputs of shape {tuple(out.shape[1:])} per example (a multi-head "
                           "network, as a partial zip with zip_until makes, gives one per head); the barrier needs one "
                           "output vector per example")
    return head.scores(out) if head is not None else out


def _loss_error(scores: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    s = scores.double()
    loss = float(F.cross_entropy(s, y, reduction="mean"))
    error = float((s.argmax(dim=1) != y).double().mean())
    return loss, error


def barrier(a: nn.Module, b: nn.Module, data, points: int = 21, *, align: str | None = None, align_data=None,
            samples: int = 400, seed: int = 0, head=None, config=None, progress: bool = True,
            batch_size: int = 1000, **options) -> BarrierResult:
    """Loss and error along the linear path between ``a`` (t = 0) and ``b`` (t = 1), aligned and depth-balanced,
    and their barriers (see the module docstring).

    ``data``: the labelled examples the curve is measured on — an ``(inputs, labels)`` pair of tensors, an iterable
    of ``(inputs, labels)`` batches (a ``DataLoader``) or a hetfuse ``Dataset`` (its test split). ``align_data``:
    the inputs the alignment draws ``samples`` from (with ``seed``), as ``fuse``'s ``data``; default the inputs of
    ``data`` (a ``Dataset``: its training split). ``align``: the neuron matcher (default ``ot-acts``, fuse's;
    ``"none"``: vanilla averaging); every other keyword is a fusion option or method parameter (``depth_align``,
    ``balance``, ``similarity``, ``target``, ``solver``, ``features``, …), or pass ``config`` (a
    :class:`~hetfuse.FusionConfig`; its repair is not used). ``head``: an :class:`~hetfuse.train.OutputHead` that
    turns outputs into class scores (an embedding head scores every class of the data set, as the joint accuracy
    of ``hetfuse eval --tasks``); default the outputs are the class logits. ``points`` (≥ 3) values of t, evenly
    spaced from 0 to 1; ``progress``: a progress bar over them.
    """
    from .config import FusionConfig
    from .graph import describe
    from .hf import wrap
    from .pipeline import _fit_inputs, _progress, prepare_fusion

    if isinstance(points, bool) or not isinstance(points, int) or points < 3:
        raise HetfuseError(f"points must be an integer of at least 3 (t = 0, 1 and a point between), "
                           f"got {points!r}")
    if batch_size < 1:
        raise HetfuseError(f"batch_size must be at least 1, got {batch_size}")
    models = [wrap(m) for m in (a, b)]
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise HetfuseError(f"model {i} is a {type(m).__name__}, not a torch.nn.Module")
    from .branches import MultiBranch
    from .multihead import MultiHead

    if any(isinstance(m, MultiHead) for m in models):
        raise HetfuseError("a multi-head network (a partial zip) gives one output per head; the barrier "
                           "is measured between single-output networks")
    if any(isinstance(m, MultiBranch) for m in models):
        raise HetfuseError("a multi-branch network (preserve_until: one branch per model) has no single set of "
                           "parameters to interpolate; the barrier is measured between plain networks")
    x, y, default_align = _labelled(data)
    y = y.reshape(-1).long().cpu()
    graphs = []
    for m in models:
        try:
            graphs.append(describe(m))
        except UnsupportedModelError:  # some layouts are known only from the inputs' shape
            first = next(iter(m.parameters()), None)
            graphs.append(describe(m, example=x[:2].to(first.device if first is not None else "cpu")))
    outs = [g.output_dim for g in graphs]
    if outs[0] != outs[1]:
        raise HetfuseError(f"the models give different output sizes ({outs[0]} and {outs[1]}); the path "
                           "between them needs one output space")
    classes = head.num_classes if head is not None else outs[0]
    if head is not None and head.outputs != outs[0]:
        raise HetfuseError(f"the head scores {head.outputs} outputs, the models give {outs[0]}")
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise DataError(f"labels lie in [{int(y.min())}, {int(y.max())}], but the models score "
                        f"{classes} classes")
    if config is None:
        config = FusionConfig(match=align, samples=samples, seed=seed, repair="none", progress=progress, **options)
    elif align is not None or options:
        raise HetfuseError("pass either config or align and the fusion options, not both")
    config.validate(2)
    x = _fit_inputs(x, graphs[0])
    own = [_loss_error(_scores(m, x, head, batch_size), y) for m in models]
    prepared = prepare_fusion(models, default_align if align_data is None else align_data, config)
    ts = [k / (points - 1) for k in range(points)]
    loss, error = [], []
    for t in _progress(ts, "barrier", config.progress):
        model = prepared.combine([1.0 - t, t], repair=False)
        le = _loss_error(_scores(model, x, head, batch_size), y)
        loss.append(le[0])
        error.append(le[1])
    if not all(math.isfinite(v) for v in loss):
        raise HetfuseError("the loss is not finite along the path")
    lb, tl = barrier_of(ts, loss)
    eb, te = barrier_of(ts, error)
    return BarrierResult(ts=ts, loss=loss, error=error, loss_barrier=lb, error_barrier=eb, t_loss=tl, t_error=te,
                         model_loss=[o[0] for o in own], model_error=[o[1] for o in own],
                         match=config.stage("match").method, examples=int(y.shape[0]),
                         fusion={k: prepared.report[k] for k in _FUSION_KEYS if k in prepared.report})


_FUSION_KEYS = ("methods", "target", "depths_in", "widths_in", "balanced_widths", "fused_widths", "mappings", "notes")


__all__ = ["BarrierResult", "barrier", "barrier_of"]
