"""Paper experiments: skill transfer (CLAFusion §4.1), the cross-layer-alignment ablation (Appendix C) and
fusing more than two models."""

from __future__ import annotations

from ..errors import HetfuseError
from .ablation import run_ablation
from .cifar_oneshot import run_cifar_oneshot
from .multi_model import run_multi_model
from .skill_transfer import run_skill_transfer


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0-4"`` (a range, inclusive), ``"0,2,3"`` (a list) or a mix (``"0-2,7"``).

    Order is kept and duplicates dropped. Raises :class:`HetfuseError` for anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return [int(text)]
    seeds: list[int] = []
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise HetfuseError(f"no seeds in {text!r}; use e.g. 0-4 or 0,2,3")
    for part in parts:
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                lo, hi = int(part[:cut]), int(part[cut + 1:])
                if hi < lo:
                    raise HetfuseError(f"seed range {part!r} runs backwards")
                vals = list(range(lo, hi + 1))
            else:
                vals = [int(part)]
        except ValueError as e:
            if isinstance(e, HetfuseError):
                raise
            raise HetfuseError(f"bad seed specification {part!r} in {text!r}; use e.g. 0-4 or 0,2,3") from None
        for v in vals:
            if v < 0:
                raise HetfuseError(f"seeds must be non-negative, got {v}")
            if v not in seeds:
                seeds.append(v)
    return seeds


def run_cifar_experiment(setup: str, *, seeds, **kwargs):
    """``hetfuse experiment cifar-resnet|cifar-vgg``: one run per seed, each in ``out_dir/seed<N>``
    when several seeds are given."""
    from pathlib import Path

    out = Path(kwargs.pop("out_dir"))
    rows = []
    for s in seeds:
        rows += run_cifar_oneshot(setup=setup, seed=s, out_dir=out if len(seeds) == 1 else out / f"seed{s}", **kwargs)
    return rows


__all__ = ["parse_seeds", "run_ablation", "run_cifar_experiment", "run_cifar_oneshot", "run_multi_model",
           "run_skill_transfer"]
