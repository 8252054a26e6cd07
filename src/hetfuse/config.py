"""One validated configuration object for a fusion (mergekit-style), written beside every CLI output."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import HetfuseError

REPRESENTATIONS = ("neurons", "cka", "cka-rbf", "wasserstein", "weights")
BALANCES = ("add", "merge")
MATCHES = ("ot-acts", "ot-weights", "none")
SOLVERS = ("exact", "sinkhorn")
MERGE_SIGNS = ("sum", "majority")


@dataclass
class FusionConfig:
    """Every option of a fusion.

    weights: one non-negative weight per model, summing to 1 (None: uniform). ``weights[i]`` always
        belongs to ``models[i]``, in fusion, vanilla averaging and the prediction ensemble alike.
    target: index of the model whose widths (and neuron order) the fused model takes; None picks the
        shallowest model (the first of equal depth), as CLAFusion does.
    representation: layer representation for cross-layer alignment: ``neurons`` (number of neurons,
        squared Euclidean), ``cka`` (1 - linear CKA of pre-activations), ``cka-rbf``, ``wasserstein``
        (between neuron point clouds), ``weights`` (cosine distance of weight spectra).
    balance: ``add`` identity layers to the shallower models (fused depth = deepest model) or
        ``merge`` the deeper models' unmatched layers (fused depth = shallowest model).
    match: ``ot-acts`` (ground cost from pre-activations), ``ot-weights`` (from incoming weights after
        the previous layer's transport) or ``none`` (vanilla averaging, equal widths only).
    solver: ``exact`` (permutation via linear_sum_assignment for equal widths, network simplex
        otherwise) or ``sinkhorn`` (entropic, log domain, regularisation ``reg``).
    samples: number of inputs used for activations, alignment and repair statistics.
    repair: REPAIR statistics correction of the fused model (default on: it helped at every seed in
        the skill-transfer probe of the reference code).
    fix_first / fix_last: CLA constraints that the first / last hidden layers are matched.
    merge_sign: ReLU gate estimate for ``merge``: ``sum`` or ``majority``.
    """

    weights: list[float] | None = None
    target: int | None = None
    representation: str = "neurons"
    balance: str = "add"
    match: str = "ot-acts"
    solver: str = "exact"
    reg: float = 0.01
    samples: int = 400
    repair: bool = True
    seed: int = 0
    fix_first: bool = True
    fix_last: bool = True
    merge_sign: str = "sum"
    progress: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self, n_models: int | None = None) -> "FusionConfig":
        def choice(name: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise HetfuseError(f"{name}={value!r} is not one of: {', '.join(options)}")

        choice("representation", self.representation, REPRESENTATIONS)
        choice("balance", self.balance, BALANCES)
        choice("match", self.match, MATCHES)
        choice("solver", self.solver, SOLVERS)
        choice("merge_sign", self.merge_sign, MERGE_SIGNS)
        if not isinstance(self.samples, int) or self.samples < 2:
            raise HetfuseError(f"samples must be an integer >= 2, got {self.samples!r}")
        if not (self.reg > 0 and math.isfinite(self.reg)):
            raise HetfuseError(f"reg must be a positive number, got {self.reg!r}")
        if n_models is not None:
            if n_models < 2:
                raise HetfuseError(f"fusion needs at least two models, got {n_models}")
            if self.target is not None and not (0 <= self.target < n_models):
                raise HetfuseError(f"target={self.target} is not an index into {n_models} models")
            self.weights = normalize_weights(self.weights, n_models)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "FusionConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise HetfuseError(f"unknown fusion options: {', '.join(sorted(unknown))}")
        return cls(**d)


def normalize_weights(weights, n: int, *, tol: float = 1e-6) -> list[float]:
    """Validate model weights: ``n`` finite non-negative numbers summing to 1 (None: uniform)."""
    if weights is None:
        return [1.0 / n] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise HetfuseError(f"weights must be numbers, got {weights!r}") from None
    if len(w) != n:
        raise HetfuseError(f"need one weight per model: {n} models, {len(w)} weights")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise HetfuseError(f"weights must be non-negative and finite, got {w}")
    if abs(sum(w) - 1.0) > tol:
        raise HetfuseError(f"weights must sum to 1, got {w} (sum {sum(w):.6g})")
    return w
