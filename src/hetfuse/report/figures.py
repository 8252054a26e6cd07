"""Figures of a fusion report (matplotlib, imported only here)."""

from __future__ import annotations

import warnings
from pathlib import Path
import contextlib


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def alternative_alignments(group: dict, chosen: str) -> dict[str, list[int]]:
    """The alignments CLA, SMA and LMA give on a group's matrix (as a similarity: the negated or 1 − cost), with the
    group's constraints; the chosen method's own first."""
    import numpy as np

    from ..align.dp import align_depth

    m = np.asarray(group["matrix"], dtype=float)
    bounded = group.get("bounded", True)
    if group.get("matrix_kind") == "cost":
        cost, sim = m, (1.0 - m if bounded else -m)
    else:
        sim, cost = m, (1.0 - m if bounded else -m)
    out = {chosen: list(group["alignment"])}
    for method in ("cla", "sma", "lma"):
        if method != chosen:
            with contextlib.suppress(ValueError):
                out[method] = align_depth(cost if method == "cla" else sim, method,
                                          fix_first=bool(group.get("fix_first", True)),
                                          fix_last=bool(group.get("fix_last", True)))
    return out


def plot_alignment_matrices(report: dict, folder: str | Path) -> list[str]:
    """One PNG per aligned group of every network: the deep × shallow similarity (or cost) matrix with the
    alignments of CLA, SMA and LMA drawn on it (the chosen one first; units 1-based on the axes; the
    heterogeneous-merging paper's Fig. 3). Returns the file names written into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    method = report.get("methods", {}).get("depth_align", "cla")
    sim = report.get("methods", {}).get("similarity", "")
    for mp in report.get("mappings", []):
        for g in mp.get("groups", []):
            if g.get("matrix") is None:
                continue
            name = f"depth_{method}_model{mp['model']}_{g['name']}.png"
            plot_matrix(g["matrix"], alternative_alignments(g, method), folder / name,
                        title=f"{method}: {g.get('matrix_kind', 'cost')} ({sim}), {g['name']}",
                        xlabel=f"model {mp['model'] if mp['role'] == 'shallow' else g['reference']}: shallow unit",
                        ylabel=f"model {g['reference'] if mp['role'] == 'shallow' else mp['model']}: deep unit")
            written.append(name)
    return written


def plot_matrix(matrix, alignments: dict[str, list[int]], path: str | Path, *, title: str = "",
                xlabel: str = "shallow unit", ylabel: str = "deep unit") -> None:
    """A deep × shallow matrix as a heat map with each named alignment drawn as markers (0-based in, 1-based
    on the axes)."""
    import numpy as np

    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.2, 2.2 + 0.55 * m.shape[1]), max(3.4, 1.8 + 0.42 * m.shape[0])))
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8)
    markers = ["o", "s", "^", "D", "v"]
    colors = ["red", "cyan", "orange", "magenta", "white"]
    for k, (label, a) in enumerate(alignments.items()):
        ax.plot(range(m.shape[1]), a, markers[k % 5], color=colors[k % 5], markersize=max(5, 13 - 3 * k),
                fillstyle="none", markeredgewidth=2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(m.shape[1]), [str(j + 1) for j in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), [str(i + 1) for i in range(m.shape[0])])
    if title:
        ax.set_title(title, fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=8, ncol=len(alignments), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weight_sweep(weights, panels: dict[str, dict[str, list[tuple[float, float]]]], lines: dict[str, float],
                      path: str | Path, *, xlabel: str = "weight of the second model",
                      ylabel: str = "test accuracy (%)", title: str = "") -> None:
    """Accuracy against the fusion weight: one panel per entry of ``panels`` (title -> {curve label -> [(mean,
    std) per weight]}), a band of ± std around each curve, and horizontal ``lines`` (label -> value)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), sharey=True, squeeze=False)
    styles = ["o-", "o-", "s-", "--", "^-", "v-"]
    colors = ["tab:blue", "tab:green", "tab:purple", "gray", "tab:brown", "tab:pink"]
    for ax, (name, curves) in zip(axes[0], panels.items(), strict=False):
        for k, (label, points) in enumerate(curves.items()):
            m = [p[0] for p in points]
            s = [p[1] for p in points]
            ax.plot(weights, m, styles[k % 6], color=colors[k % 6], label=label)
            if any(v > 0 for v in s):
                ax.fill_between(weights, [a - b for a, b in zip(m, s, strict=False)],
                                [a + b for a, b in zip(m, s, strict=False)],
                                color=colors[k % 6], alpha=0.15)
        for k, (label, value) in enumerate(lines.items()):
            ax.axhline(value, color=["tab:red", "tab:orange", "tab:olive"][k % 3], lw=1, ls=":",
                       label=f"{label} ({value:.2f})")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, dpi=120)
    plt.close(fig)
