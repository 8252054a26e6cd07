"""Figures of a fusion report (matplotlib, imported only here)."""

from __future__ import annotations

import warnings
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_alignment_matrices(report: dict, folder: str | Path) -> list[str]:
    """One PNG per aligned group of every network: the deep × shallow cost or similarity matrix with the chosen
    alignment drawn on it (units 1-based on the axes). Returns the file names written into ``folder``."""
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
            plot_matrix(g["matrix"], {method: g["alignment"]}, folder / name,
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
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * m.shape[1], 1.2 + 0.45 * m.shape[0]))
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8)
    markers = ["o", "s", "^", "D", "v"]
    colors = ["red", "white", "orange", "cyan", "magenta"]
    for k, (label, a) in enumerate(alignments.items()):
        ax.plot(range(m.shape[1]), a, markers[k % 5], color=colors[k % 5], markersize=11 - 2 * k, fillstyle="none",
                markeredgewidth=2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(m.shape[1]), [str(j + 1) for j in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), [str(i + 1) for i in range(m.shape[0])])
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8, ncol=len(alignments))
    fig.tight_layout()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, dpi=110)
    plt.close(fig)
