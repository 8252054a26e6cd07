"""Paper experiments: skill transfer (CLAFusion §4.1), the cross-layer-alignment ablation (Appendix C), fusing
more than two models, one-shot CLAFusion of CNNs on CIFAR-10 and CLAFusion's Tables 1-4 (CPU scale), class-split
merging (the heterogeneous-merging paper)."""

from __future__ import annotations

from .ablation import run_ablation
from .cifar_oneshot import run_cifar_oneshot
from .clafusion_tables import run_clafusion_table
from .class_split import run_class_split
from .common import parse_seeds
from .multi_model import run_multi_model
from .skill_methods import run_skill_methods
from .skill_transfer import run_skill_transfer


def run_cifar_experiment(setup: str, *, seeds, **kwargs):
    """``hetfuse experiment cifar-resnet|cifar-vgg``: one run per seed, each in ``out_dir/seed<N>`` when several
    seeds are given."""
    from pathlib import Path

    out = Path(kwargs.pop("out_dir"))
    rows = []
    for s in seeds:
        rows += run_cifar_oneshot(setup=setup, seed=s, out_dir=out if len(seeds) == 1 else out / f"seed{s}", **kwargs)
    if len(seeds) > 1:
        from .cifar_oneshot import write_seed_summary

        write_seed_summary(out, setup, rows, kwargs.get("command"))
    return rows


__all__ = ["parse_seeds", "run_ablation", "run_cifar_experiment", "run_cifar_oneshot", "run_clafusion_table",
           "run_class_split",
           "run_multi_model", "run_skill_methods", "run_skill_transfer"]
