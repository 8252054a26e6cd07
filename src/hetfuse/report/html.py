"""Self-contained HTML reports: ``DIR/index.html`` with figures (PNG) beside it, no scripts, no network access.

* :func:`write_fusion_report` — ``hetfuse fuse … --report DIR``: the configuration, the inputs, the depth-
  alignment matrices with each aligner's choice drawn on them, the per-layer matching cost, timings and an
  accuracy table (each input, their prediction ensemble, the fused model; joint and per-task accuracy for
  class-split models).
* :func:`write_experiment_report` — every ``hetfuse experiment``: its ``summary.md`` (tables with the papers'
  numbers, the wB curves of sweeps), the command, every figure in the folder (and its seed folders), the
  alignment matrices of its ``report.json`` and links to the raw CSV/JSON.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 70rem;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.55rem; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f5; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 0.85rem; }
pre { background: #f6f8fa; padding: 0.7rem; overflow-x: auto; }
figure { display: inline-block; margin: 0.5rem 1rem 0.5rem 0; vertical-align: top; }
figure img { max-width: 32rem; border: 1px solid #eee; }
figcaption { font-size: 0.8rem; color: #555; }
.note { color: #555; font-size: 0.9rem; }
"""


def _inline(text: str) -> str:
    """Inline markdown of our summaries: `code`, **bold**, [links](url); everything else escaped."""
    out, pos = [], 0
    for m in re.finditer(r"`([^`]+)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\(([^)\s]+)\)", text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1))}</code>")
        elif m.group(2) is not None:
            out.append(f"<strong>{html.escape(m.group(2))}</strong>")
        else:
            out.append(f'<a href="{html.escape(m.group(4), quote=True)}">{html.escape(m.group(3))}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip() for c in line.split("|")]


def markdown_to_html(text: str, *, shift: int = 0) -> str:
    """The markdown the summaries use (headings, paragraphs, pipe tables, bullet lists, fenced code) as HTML.
    ``shift`` demotes headings (``#`` becomes ``h{1 + shift}``)."""
    lines = text.splitlines()
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append(f"<pre><code>{html.escape(chr(10).join(lines[i + 1:j]))}</code></pre>")
            i = j + 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if m:
            flush()
            level = min(6, len(m.group(1)) + shift)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif stripped.startswith("|") and i + 1 < len(lines) and re.match(r"^\|?\s*:?-{3,}", lines[i + 1].strip()):
            flush()
            head = _cells(stripped)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + f"</tr></thead><tbody>{body}</tbody></table>")
            continue
        elif re.match(r"^[-*]\s+", stripped):
            flush()
            items = []
            while i < len(lines) and re.match(r"^[-*]\s+", lines[i].strip()):
                item = re.sub(r"^[-*]\s+", "", lines[i].strip())
                i += 1
                while i < len(lines) and lines[i].startswith("  ") and lines[i].strip() and \
                        not re.match(r"^[-*]\s+", lines[i].strip()):
                    item += " " + lines[i].strip()
                    i += 1
                items.append(f"<li>{_inline(item)}</li>")
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    return "\n".join(out)


def _table(header, rows) -> str:
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            + f"</tr></thead><tbody>{body}</tbody></table>")


def _figures(names: list[str], folder: Path) -> str:
    parts = []
    for name in names:
        if (folder / name).is_file():
            parts.append(f'<figure><img src="{html.escape(name, quote=True)}" alt="{html.escape(name, quote=True)}">'
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    return "\n".join(parts)


def write_page(folder: str | Path, title: str, body: str) -> Path:
    """Write ``folder/index.html`` (title, inline CSS, the body)."""
    from ..io.checkpoint import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    path = folder / "index.html"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path


def plot_matching_costs(report: dict, path: str | Path) -> str | None:
    """Bar chart of the matching cost of every neuron space, one bar group per model (the transport or
    assignment cost that model's neurons paid to reach the fused space). Returns the file name or None."""
    costs = (report.get("match_info") or {}).get("costs")
    if not costs or not any(any(float(c) for c in row) for row in costs):
        return None
    from .figures import _plt

    plt = _plt()
    n = max(len(r) for r in costs)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * n + 2), 3))
    width = 0.8 / len(costs)
    for i, row in enumerate(costs):
        ax.bar([s + i * width for s in range(len(row))], [float(c) for c in row], width=width, label=f"model {i}")
    ax.set_xticks([s + 0.4 - width / 2 for s in range(n)], [str(s + 1) for s in range(n)])
    ax.set_xlabel("neuron space (1-based)")
    ax.set_ylabel("matching cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_fusion_report(folder: str | Path, report: dict, *, accuracy: dict | None = None) -> Path:
    """``folder/index.html`` of one fusion (``report`` as ``hetfuse fuse`` writes it to report.json, with its
    ``figures``). ``accuracy``: ``{"header": [...], "rows": [[...], ...], "note": str}``."""
    from .tables import describe_alignment

    folder = Path(folder)
    cost_fig = plot_matching_costs(report, folder / "matching_cost.png")
    parts = ["<h2>Inputs</h2>",
             _table(["model", "checkpoint", "depth", "hidden widths"],
                    [[i, p, d, ", ".join(map(str, w))] for i, (p, d, w) in
                     enumerate(zip(report.get("inputs", ["?"] * report["n_models"]), report["depths_in"],
                                   report["widths_in"], strict=False))]),
             f'<p class="note">Data: {html.escape(str(report.get("dataset", "")))}; '
             f'{html.escape(str(report.get("alignment_samples", "")))}; '
             f'weights {html.escape(str(report.get("weights")))}; '
             f'target model {report["target"]}; fused hidden widths '
             f'{html.escape(", ".join(map(str, report["fused_widths"])))}.</p>',
             "<h2>Configuration</h2>",
             _table(["stage", "method", "parameters"],
                    [[s, st["method"], json.dumps(st.get("params", {}))] for s, st in
                     report["config"]["stages"].items()]),
             "<details><summary>the whole configuration (JSON, as fused.config.json)</summary>"
             f"<pre><code>{html.escape(json.dumps(report['config'], indent=2))}</code></pre></details>"]
    if accuracy:
        acc = ["<h2>Accuracy</h2>", _table(accuracy["header"], accuracy["rows"])]
        if accuracy.get("note"):
            acc.append(f'<p class="note">{html.escape(accuracy["note"])}</p>')
        parts[3:3] = acc
    changed = [m for m in report["mappings"] if m["changed"]]
    parts.append("<h2>Depth alignment</h2>")
    if changed:
        parts.append("<ul>" + "".join(f"<li>{html.escape(describe_alignment(m))}</li>" for m in changed) + "</ul>")
        parts.append('<p class="note">Each figure: the deep × shallow matrix of one group, with the alignment of '
                     "CLA, SMA and LMA drawn on it (the chosen aligner's first); units are 1-based.</p>")
        parts.append(_figures(list(report.get("figures", [])), folder))
    else:
        parts.append("<p>The networks have equal depths: no depth alignment.</p>")
    parts.append("<h2>Neuron matching</h2>")
    solvers = report.get("solvers") or []
    if solvers:
        costs = (report.get("match_info") or {}).get("costs") or []
        rows = []
        for i, row in enumerate(solvers):
            for s, name in enumerate(row):
                c = costs[i][s] if i < len(costs) and s < len(costs[i]) else ""
                rows.append([i, s + 1, name, f"{c:.4g}" if isinstance(c, (int, float)) else c])
        parts.append(_table(["model", "neuron space (1-based)", "solver", "matching cost"], rows))
    if cost_fig:
        parts.append(_figures([cost_fig], folder))
    if report.get("notes"):
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"]) + "</ul>"]
    parts += ["<h2>Timings</h2>", _table(["step", "seconds"], [[k, f"{v:.3f}"] for k, v in
                                                               report.get("timings", {}).items()]),
              '<p class="note">Raw data: <a href="report.json">report.json</a>.</p>']
    return write_page(folder, "hetfuse fusion report", "\n".join(parts))


def write_experiment_report(folder: str | Path, title: str | None = None) -> Path:
    """``folder/index.html`` of an experiment's output folder (see the module docstring)."""
    from .figures import plot_alignment_matrices

    folder = Path(folder)
    summaries = sorted(folder.glob("summary.md")) + sorted(folder.glob("*/summary.md"))
    parts = []
    cmd = folder / "command.txt"
    if cmd.is_file():
        parts.append(f"<h2>Command</h2><pre><code>{html.escape(cmd.read_text())}</code></pre>")
    for s in summaries:
        sub = s.parent.relative_to(folder)
        if str(sub) != ".":
            parts.append(f"<h2>{html.escape(str(sub))}</h2>")
        parts.append(markdown_to_html(s.read_text(), shift=1))
    subreports = sorted(p.parent for p in folder.glob("*/report.json") if (p.parent / "index.html").is_file())
    if subreports:  # e.g. a `hetfuse fuse --report` page of one pair: linked; it draws its own figures
        parts += ["<h2>Fusion reports</h2>", "<ul>" + "".join(
            f'<li><a href="{html.escape(d.name, quote=True)}/index.html">{html.escape(d.name)}</a></li>'
            for d in subreports) + "</ul>"]
    for rep in sorted(folder.glob("report.json")) + sorted(folder.glob("*/report.json")):
        if rep.parent in subreports:
            continue
        try:
            data = json.loads(rep.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("mappings") and any(
                g.get("matrix") is not None for m in data["mappings"] for g in m.get("groups", [])):
            plot_alignment_matrices(data, rep.parent / "alignment")
    figures = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.suffix.lower() in (".png", ".svg") and p.is_file())
    if figures:
        parts += ["<h2>Figures</h2>", _figures(figures, folder)]
    raw = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                 if p.suffix.lower() in (".csv", ".json") and p.is_file())
    if raw:
        parts += ["<h2>Raw data</h2>", "<ul>" + "".join(
            f'<li><a href="{html.escape(r, quote=True)}">{html.escape(r)}</a></li>' for r in raw) + "</ul>"]
    if title is None:
        first = summaries[0].read_text().splitlines()[0].lstrip("# ").strip() if summaries else folder.name
        title = first or folder.name
    return write_page(folder, title, "\n".join(parts))


__all__ = ["markdown_to_html", "plot_matching_costs", "write_experiment_report", "write_fusion_report", "write_page"]
