"""Figures of a fusion report (matplotlib, imported only here)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

# Font sizes in points, at the DPI each figure is saved with (the pages show a figure at its natural size or, in
# a narrow window, scaled down to the page's width): a legend never below 8 pt.
LEGEND_FONTSIZE = 9
TITLE_FONTSIZE = 10


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def alternative_alignments(group: dict, chosen: str) -> dict[str, list[int]]:
    """The alignment every dynamic-program aligner of the registry (CLA, SMA, LMA) gives on a group's matrix (as a
    cost or as a similarity, the negated or 1 − cost, whichever its objective is), with the group's constraints;
    the chosen method's own first."""
    import numpy as np

    from ..align.dp import align_depth
    from ..align.dp_aligner import DPAligner
    from ..registry import methods

    m = np.asarray(group["matrix"], dtype=float)
    bounded = group.get("bounded", True)
    if group.get("matrix_kind") == "cost":
        cost, sim = m, (1.0 - m if bounded else -m)
    else:
        sim, cost = m, (1.0 - m if bounded else -m)
    out = {chosen: list(group["alignment"])}
    for method, cls in methods("depth_align").items():
        if method != chosen and issubclass(cls, DPAligner):
            with contextlib.suppress(ValueError):
                out[method] = align_depth(cost if cls.objective == "cost" else sim, cls.variant,
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
        ax.set_title(title, fontsize=TITLE_FONTSIZE)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=LEGEND_FONTSIZE, ncol=len(alignments),
               frameon=False)
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
    axes[0][-1].legend(fontsize=LEGEND_FONTSIZE, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_matching_costs(report: dict, path: str | Path) -> str | None:
    """Bar chart of the matching cost of every neuron space, one bar group per model (the transport or
    assignment cost that model's neurons paid to reach the fused space; for zip, 1 − their correlation with the
    neurons merged with them). A model whose cost is 0 (the target of a matcher that maps onto it: its own
    space) still gets its bars: a flat outline with a "0" above it, and the legend names the target. Returns
    the file name or None (no costs, or all of them 0)."""
    costs = (report.get("match_info") or {}).get("costs")
    if not costs or not any(any(float(c) for c in row) for row in costs):
        return None
    plt = _plt()
    n = max(len(r) for r in costs)
    target = report.get("target")
    fig, ax = plt.subplots(figsize=(min(10.0, max(5.0, 0.3 * n * len(costs) / 2 + 2.5)), 3.4))
    width = 0.8 / len(costs)
    top = max(float(c) for row in costs for c in row)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(costs):
        xs = [s + i * width for s in range(len(row))]
        vals = [float(c) for c in row]
        color = colors[i % len(colors)]
        zero = all(v == 0 for v in vals)
        label = f"model {i}" + (" (target)" if i == target else "") + (": cost 0" if zero else "")
        ax.bar(xs, vals, width=width, color=color, edgecolor=color, linewidth=1.5, label=label)
        for x, v in zip(xs, vals, strict=False):
            if v == 0:
                ax.text(x, 0.01 * top, "0", ha="center", va="bottom", fontsize=8, color=color)
    ax.set_xticks([s + 0.4 - width / 2 for s in range(n)], [str(s + 1) for s in range(n)],
                  fontsize=8 if n <= 30 else 6)
    ax.set_ylim(0, 1.15 * top)
    ax.set_xlabel("neuron space (1-based)")
    ax.set_ylabel("matching cost")
    ax.legend(fontsize=LEGEND_FONTSIZE, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(costs), 3),
              frameon=False)
    fig.tight_layout()
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def plot_barrier(result: dict, path: str | Path, *, title: str = "", labels: tuple[str, str] = ("A", "B")) -> str:
    """The loss and error (%) along the linear path of a barrier (``result``: :meth:`hetfuse.barriers.BarrierResult.
    to_dict`): each curve with the straight line between its endpoints (dashed), the barrier drawn as a vertical
    segment at the t where it is reached, and each input network's own value (before alignment) as a cross at
    t = 0 and t = 1. Returns the file name."""
    plt = _plt()
    ts = [float(t) for t in result["ts"]]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.9))
    panels = [("loss", "test loss (cross-entropy)", 1.0, "loss_barrier", "t_loss"),
              ("error", "test error (%)", 100.0, "error_barrier", "t_error")]
    for ax, (key, ylabel, scale, bkey, tkey) in zip(axes, panels, strict=True):
        vals = [scale * float(v) for v in result[key]]
        v0, v1 = vals[0], vals[-1]
        ax.plot(ts, vals, "o-", color="tab:blue", markersize=4, label="interpolated network")
        ax.plot([0.0, 1.0], [v0, v1], "--", color="gray", lw=1, label="linear between the endpoints")
        own = result.get(f"model_{key}")
        if own:
            ax.plot([0.0, 1.0], [scale * float(own[0]), scale * float(own[1])], "x", color="tab:red", markersize=8,
                    markeredgewidth=2, linestyle="none", label="each model's own (before alignment)")
        t, b = float(result[tkey]), scale * float(result[bkey])
        if b > 0:
            chord = (1.0 - t) * v0 + t * v1
            ax.annotate("", xy=(t, chord + b), xytext=(t, chord),
                        arrowprops={"arrowstyle": "<->", "color": "tab:orange", "lw": 1.5})
        unit = "" if key == "loss" else " points"
        ax.set_title(f"{key} barrier {b:.4g}{unit} at t = {t:.2f}", fontsize=TITLE_FONTSIZE)
        ax.set_xlabel(f"t (0: {labels[0]}, 1: {labels[1]})")
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", fontsize=LEGEND_FONTSIZE, ncol=len(names), frameon=False)
    if title:
        fig.suptitle(title, fontsize=TITLE_FONTSIZE)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
