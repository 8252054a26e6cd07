"""One validated configuration object for a fusion, written as JSON beside every CLI output.

A fusion is the pipeline similarity → depth aligner → balancer → neuron matcher → repair; the
configuration names one registered method per stage (see :mod:`hetfuse.registry`) with its parameters,
plus the options of the whole run (weights, target, sample counts, seed).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HetfuseError
from .registry import FAMILIES, get_method, make_params, methods, param_infos

STAGES = tuple(FAMILIES)  # similarity, depth_align, balance, match, repair (pipeline order)
DEFAULT_METHODS = {"similarity": "neurons-cka", "depth_align": "cla", "balance": "add", "match": "ot-acts",
                   "repair": "auto"}
CONFIG_FORMAT = "hetfuse-fusion-config"
CONFIG_VERSION = 2

# Options of the version-1 (flat) configuration and where they live now.
_LEGACY_STAGE_KEYS = {"representation": "similarity", "balance": "balance", "match": "match"}
_LEGACY_PARAMS = {"solver": "match", "reg": "match", "fix_first": "depth_align", "fix_last": "depth_align",
                  "merge_sign": "balance"}


@dataclass
class Stage:
    """One stage of the pipeline: a registered method and its (validated) parameters."""

    method: str
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "params": dict(self.params)}


class FusionConfig:
    """Every option of a fusion, validated when built.

    Run options: ``weights`` (one per model, non-negative, summing to 1; None: uniform; ``weights[i]``
    always belongs to ``models[i]``), ``target`` (index of the model whose widths and neuron order the
    fused model takes; None: the shallowest, first of equal depth, as CLAFusion), ``samples`` (inputs for
    activations and alignment), ``repair_samples`` (inputs for the repair statistics; capped by the data),
    ``seed``, ``progress``, ``preserve_until`` (keep the first K depth units of every model unmerged, one branch per
    model, and merge from unit K on — :class:`~hetfuse.branches.MultiBranch`; None or 0: the plain merge) and
    ``preserve_renorm`` (with ``preserve_until``: set the averaged branch features' mean and std on the repair samples
    to the share-weighted mean and std of the branches' own; default True) and ``positions`` (per sample, at most
    this many positions — pixels of a feature map, tokens — enter the matching statistics, the same evenly spread
    ones in every model; None, the default: all, exact).

    Stages: ``similarity`` (alias ``representation``), ``depth_align``, ``balance``, ``match``, ``repair``
    each take a method name; ``repair`` also takes ``True`` (= ``"auto"``) and ``False`` (= ``"none"``).
    Every other keyword is a parameter of one of the chosen methods (e.g. ``solver="sinkhorn"`` of
    ``ot-acts``, ``fix_first=False`` of ``cla``, ``merge_sign`` of ``merge``); a keyword that none of them
    declares is an error naming the known parameters.
    """

    def __init__(self, *, weights=None, target: int | None = None, samples: int = 400,
                 repair_samples: int = 2000, seed: int = 0, progress: bool = False,
                 preserve_until: int | None = None, preserve_renorm: bool = True, positions: int | None = None,
                 similarity: str | None = None, representation: str | None = None, depth_align: str | None = None,
                 balance: str | None = None, match: str | None = None, repair: str | bool | None = None,
                 stages: dict | None = None, **params) -> None:
        if similarity is not None and representation is not None and similarity != representation:
            raise HetfuseError(f"representation={representation!r} and similarity={similarity!r} disagree "
                               "(they are the same option)")
        chosen = {"similarity": similarity if similarity is not None else representation,
                  "depth_align": depth_align, "balance": balance, "match": match,
                  "repair": {True: "auto", False: "none"}.get(repair, repair) if isinstance(repair, bool) else repair}
        given: dict[str, dict] = {s: {} for s in STAGES}
        if stages:
            for name, st in stages.items():
                if name not in STAGES:
                    raise HetfuseError(f"unknown pipeline stage {name!r}; stages: {', '.join(STAGES)}")
                st = st.to_dict() if isinstance(st, Stage) else dict(st)
                if chosen[name] is not None and chosen[name] != st.get("method"):
                    raise HetfuseError(f"stage {name} given twice: {chosen[name]!r} and {st.get('method')!r}")
                chosen[name] = st.get("method")
                given[name].update(st.get("params") or {})
        if chosen["depth_align"] is None:
            chosen["depth_align"] = DEFAULT_METHODS["depth_align"]
        if chosen["similarity"] is None:  # the aligner's own default (neurons for cla, CKA for sma/lma)
            chosen["similarity"] = getattr(get_method("depth_align", chosen["depth_align"]), "default_similarity",
                                           DEFAULT_METHODS["similarity"])
        for s in STAGES:
            if chosen[s] is None:
                chosen[s] = DEFAULT_METHODS[s]
            if not isinstance(chosen[s], str):
                raise HetfuseError(f"{s} must be a method name, got {chosen[s]!r}")
            get_method(s, chosen[s])  # unknown names raise, naming the known ones
        # distribute the remaining keywords to the stage whose chosen method declares them
        for key, value in params.items():
            owners = [s for s in STAGES if key in {p.name for p in param_infos(get_method(s, chosen[s]))}]
            if not owners:
                raise HetfuseError(_unknown_param_message(key, chosen))
            given[owners[0]][key] = value
        self.stages: dict[str, Stage] = {}
        for s in STAGES:
            cls = get_method(s, chosen[s])
            p = make_params(cls, given[s])
            self.stages[s] = Stage(chosen[s], dataclasses.asdict(p))
        self.weights = None if weights is None else _check_weight_values(weights)
        self.target = target
        self.samples = samples
        self.repair_samples = repair_samples
        self.seed = seed
        self.progress = bool(progress)
        self.preserve_until = preserve_until
        self.preserve_renorm = preserve_renorm
        self.positions = positions
        self.validate()

    # ----------------------------------------------------------------------------------- access

    def stage(self, name: str) -> Stage:
        return self.stages[name]

    def method(self, name: str):
        """An instance of the method chosen for stage ``name``."""
        st = self.stages[name]
        return get_method(name, st.method)(**st.params)

    @property
    def similarity(self) -> str:
        return self.stages["similarity"].method

    representation = similarity

    @property
    def depth_align(self) -> str:
        return self.stages["depth_align"].method

    @property
    def balance(self) -> str:
        return self.stages["balance"].method

    @property
    def match(self) -> str:
        return self.stages["match"].method

    @property
    def repair(self) -> str:
        return self.stages["repair"].method

    def replace(self, **changes) -> FusionConfig:
        """A copy with some options changed (same rules as the constructor)."""
        d = self.to_dict()
        run = {k: d.get(k) for k in ("weights", "target", "samples", "repair_samples", "seed", "preserve_until",
                                     "preserve_renorm", "positions")}
        run["progress"] = self.progress
        stages = {s: dict(v) for s, v in d["stages"].items()}
        for s in STAGES:
            alias = "representation" if s == "similarity" and "representation" in changes else s
            if alias in changes:
                new = changes.pop(alias)
                new = {True: "auto", False: "none"}.get(new, new) if isinstance(new, bool) else new
                if new != stages[s]["method"]:
                    stages[s] = {"method": new, "params": {}}
        run.update({k: changes.pop(k) for k in list(changes) if k in run})
        cfg = FusionConfig(stages=stages, **run)
        if changes:  # method parameters
            for key, value in changes.items():
                owners = [s for s in STAGES if key in cfg.stages[s].params]
                if not owners:
                    raise HetfuseError(_unknown_param_message(key, {s: cfg.stages[s].method for s in STAGES}))
                stages[owners[0]] = {"method": cfg.stages[owners[0]].method,
                                     "params": dict(cfg.stages[owners[0]].params, **{key: value})}
            cfg = FusionConfig(stages=stages, **run)
        return cfg

    # ----------------------------------------------------------------------------------- checks

    def validate(self, n_models: int | None = None) -> FusionConfig:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            raise HetfuseError(f"samples must be an integer >= 2, got {self.samples!r}")
        if isinstance(self.repair_samples, bool) or not isinstance(self.repair_samples, int) or \
                self.repair_samples < 2:
            raise HetfuseError(f"repair_samples must be an integer >= 2, got {self.repair_samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise HetfuseError(f"seed must be an integer, got {self.seed!r}")
        if self.target is not None and (isinstance(self.target, bool) or not isinstance(self.target, int)
                                        or self.target < 0):
            raise HetfuseError(f"target must be a model index (a non-negative integer), got {self.target!r}")
        k = self.preserve_until
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise HetfuseError(f"preserve_until must be a number of depth units (an integer >= 0), got {k!r}")
        q = self.positions
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
            raise HetfuseError(f"positions must be a number of positions per sample (an integer >= 1) or None "
                               f"(all), got {q!r}")
        if not isinstance(self.preserve_renorm, bool):
            raise HetfuseError(f"preserve_renorm must be True or False, got {self.preserve_renorm!r}")
        if k and self.stages["match"].params.get("zip_until"):
            raise HetfuseError(f"preserve_until={k} cannot be combined with {self.match}'s zip_until="
                               f"{self.stages['match'].params['zip_until']}: both cut the network (one keeps every "
                               "model's early units, the other every model's late units); choose one")
        if n_models is not None:
            if n_models < 2:
                raise HetfuseError(f"fusion needs at least two models, got {n_models}")
            if self.target is not None and not (0 <= self.target < n_models):
                raise HetfuseError(f"target={self.target} is not an index into {n_models} models")
            self.weights = normalize_weights(self.weights, n_models)
        return self

    # ----------------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "weights": self.weights, "target": self.target,
                "samples": self.samples, "repair_samples": self.repair_samples, "seed": self.seed,
                "preserve_until": self.preserve_until, "preserve_renorm": self.preserve_renorm,
                **({"positions": self.positions} if self.positions is not None else {}),
                "stages": {s: st.to_dict() for s, st in self.stages.items()}}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> FusionConfig:
        """Read a configuration written by :meth:`to_dict`, or a version-1 (flat) one of hetfuse 0.1."""
        if not isinstance(d, dict):
            raise HetfuseError(f"a fusion configuration must be a JSON object, got {type(d).__name__}")
        if "stages" in d:
            version = d.get("version", CONFIG_VERSION)
            if version != CONFIG_VERSION:
                raise HetfuseError(f"fusion configuration version {version} is not supported "
                                   f"(this hetfuse reads versions 1 and {CONFIG_VERSION})")
            run = {k: d[k] for k in ("weights", "target", "samples", "repair_samples", "seed", "progress",
                                     "preserve_until", "preserve_renorm", "positions") if k in d}
            return cls(stages=d["stages"], **run)
        return cls._from_flat(d)

    @classmethod
    def _from_flat(cls, d: dict) -> FusionConfig:
        known = {"weights", "target", "samples", "seed", "progress", "repair", "extra",
                 *_LEGACY_STAGE_KEYS, *_LEGACY_PARAMS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise HetfuseError(f"unknown fusion options: {', '.join(unknown)} (neither a version-{CONFIG_VERSION} "
                               "configuration with 'stages' nor a version-1 flat one)")
        run = {k: d[k] for k in ("weights", "target", "samples", "seed", "progress") if k in d}
        chosen = {stage: d[key] for key, stage in _LEGACY_STAGE_KEYS.items() if key in d}
        if "repair" in d:
            chosen["repair"] = "auto" if d["repair"] else "none"
        stages = {s: {"method": m, "params": {}} for s, m in chosen.items()}
        for key, stage in _LEGACY_PARAMS.items():
            if key not in d:
                continue
            if key == "reg" and d.get("solver", "exact") != "sinkhorn":
                continue  # version 1 stored reg always; it only acted with the sinkhorn solver
            method = chosen.get(stage, DEFAULT_METHODS[stage])
            if key in {p.name for p in param_infos(get_method(stage, method))}:
                stages.setdefault(stage, {"method": method, "params": {}})["params"][key] = d[key]
            # a version-1 file stores every option; those the chosen method does not take had no effect
        return cls(stages=stages, **run)

    def __repr__(self) -> str:
        return f"FusionConfig({json.dumps(self.to_dict())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, FusionConfig) and self.to_dict() == other.to_dict() and \
            self.progress == other.progress


def _unknown_param_message(key: str, chosen: dict) -> str:
    parts = []
    for s in STAGES:
        names = [p.name for p in param_infos(get_method(s, chosen[s]))]
        parts.append(f"{chosen[s]}: {', '.join(names) or 'none'}")
    elsewhere = sorted({f"{cls.name}" for s in STAGES for cls in methods(s).values()
                        if key in {p.name for p in param_infos(cls)}})
    hint = f"; it is a parameter of {', '.join(elsewhere)}" if elsewhere else ""
    return (f"unknown fusion option {key!r}{hint}. The chosen methods take: " + "; ".join(parts) +
            "; run options: weights, target, samples, repair_samples, seed, progress, preserve_until, preserve_renorm, "
            "positions")


def _check_weight_values(weights) -> list[float]:
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise HetfuseError(f"weights must be numbers, got {weights!r}") from None
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise HetfuseError(f"weights must be non-negative and finite, got {w}")
    if w and abs(sum(w) - 1.0) > 1e-6:
        raise HetfuseError(f"weights must sum to 1, got {w} (sum {sum(w):.6g})")
    return w


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
