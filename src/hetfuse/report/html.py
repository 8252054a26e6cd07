"""Self-contained HTML reports: ``DIR/index.html`` with figures (PNG) beside it, no scripts, no network access.

* :func:`write_fusion_report` — ``hetfuse fuse … --report DIR``: the configuration, the inputs, the depth-
  alignment matrices with each aligner's choice drawn on them, the per-layer matching cost, timings and an
  accuracy table (each input, their prediction ensemble, the fused model; joint and per-task accuracy for
  class-split models).
* :func:`write_experiment_report` — every ``hetfuse experiment``: its ``summary.md`` (tables with the papers'
  numbers, the wB curves of sweeps), the command, every figure in the folder (and its seed folders), the
  alignment matrices of its ``report.json`` and links to the raw CSV/JSON.

Every page fits its window: a table whose long cells, wrapped, still do not fit scrolls sideways in its own
box; figures shrink to the page's width. No page shows an absolute path of the machine that wrote it: files are
named relative to the page or as ``$HETFUSE_CACHE/…``, ``$HETFUSE_DATA/…``, ``~/…`` (:func:`display_path`,
:func:`scrub_paths`).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from .figures import plot_matching_costs

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 70rem;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; overflow-wrap: break-word; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05rem; }
.table-wrap { max-width: 100%; overflow-x: auto; margin: 0.8rem 0; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.55rem; text-align: right; vertical-align: top; }
th.nw, td.nw, span.nw { white-space: nowrap; }
td.long { overflow-wrap: anywhere; min-width: 10rem; text-align: left; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f5; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 0.85rem; }
pre { background: #f6f8fa; padding: 0.7rem; overflow-x: auto; }
figure { display: inline-block; margin: 0.5rem 1rem 0.5rem 0; vertical-align: top; max-width: calc(100% - 1rem); }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
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
            out.append(_html_table([(_inline(c), c) for c in head], [[(_inline(c), c) for c in r] for r in rows]))
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


_SHORT_CELL = 24  # characters: a cell this short (a number, "23.75 ± 0.42", a name) never wraps


_MEAN_STD = re.compile(r"^\s*([^\s±]+)\s*±\s*([^\s±]+)\s*$")


def _cell(tag: str, content: str, plain: str) -> str:
    """One table cell: a short one (a number) kept on one line, except that ``mean ± std`` may break before the
    ``±`` in a crowded table; a long one (a list of widths, a path, JSON) allowed to wrap, even inside a word, so
    that the table fits the page."""
    m = _MEAN_STD.match(plain)
    if m and content == html.escape(plain):
        a, b = (html.escape(g) for g in m.groups())
        return f'<{tag}><span class="nw">{a}</span> <span class="nw">± {b}</span></{tag}>'
    cls = "nw" if len(plain) <= _SHORT_CELL else "long" if tag == "td" else ""
    attr = f' class="{cls}"' if cls else ""
    return f"<{tag}{attr}>{content}</{tag}>"


def _html_table(header: list[tuple[str, str]], rows: list[list[tuple[str, str]]]) -> str:
    """A table of (HTML, plain text) cells in a container that scrolls sideways when the table, its long cells
    wrapped, is still wider than the page (the page itself never gets wider than the window)."""
    body = "".join("<tr>" + "".join(_cell("td", h, t) for h, t in r) + "</tr>" for r in rows)
    return ('<div class="table-wrap"><table><thead><tr>' + "".join(_cell("th", h, t) for h, t in header)
            + f"</tr></thead><tbody>{body}</tbody></table></div>")


def _table(header, rows) -> str:
    def cell(c):
        return html.escape(str(c)), str(c)

    return _html_table([cell(h) for h in header], [[cell(c) for c in r] for r in rows])


# ---------------------------------------------------------------------------------------------- paths

def _roots() -> list[tuple[str, str]]:
    """(absolute folder of this machine, what a page shows instead), the most specific first: the cache root
    (``$HETFUSE_CACHE``), the data root (``$HETFUSE_DATA``), the home folder (``~``)."""
    import os

    from ..cache import CACHE_ENV_VAR, cache_root

    out = [(os.path.abspath(cache_root()), f"${CACHE_ENV_VAR}")]
    data = os.environ.get("HETFUSE_DATA")
    if data and os.path.isabs(os.path.expanduser(data)):
        out.append((os.path.abspath(os.path.expanduser(data)), "$HETFUSE_DATA"))
    home = os.path.expanduser("~")
    if os.path.isabs(home):
        out.append((os.path.abspath(home), "~"))
    for root, label in list(out):  # the same folders reached through symbolic links
        real = os.path.realpath(root)
        if real != root:
            out.append((real, label))
    return sorted({r: lab for r, lab in out if len(r) > 1}.items(), key=lambda rl: -len(rl[0]))


# a home folder or hetfuse's default cache root in text written on another machine
_FOREIGN = [(re.compile(r"(?<![\w.~$/-])(?:/root|/home/[^/\s<>\"'`]+|/Users/[^/\s<>\"'`]+)/\.cache/hetfuse(?![\w.-])"),
             r"$HETFUSE_CACHE"),
            (re.compile(r"(?<![\w.~$/-])(?:/root|/home/[^/\s<>\"'`]+|/Users/[^/\s<>\"'`]+)(?=/|[\s<>\"'`)\]]|$)"),
             "~")]


def scrub_paths(text: str) -> str:
    """``text`` (plain or HTML) with every absolute path under this machine's cache root, data root or home
    folder written as ``$HETFUSE_CACHE/…``, ``$HETFUSE_DATA/…`` or ``~/…`` (and the home folders or default
    cache root of other machines, in text written there, likewise): a page does not show where its author
    keeps files."""
    for root, label in _roots():
        text = re.sub(r"(?<![\w.~$/-])" + re.escape(root) + r"(?![\w.-])", lambda _m, lab=label: lab, text)
    for pattern, label in _FOREIGN:
        text = pattern.sub(lambda _m, lab=label: lab, text)
    return text


def display_path(path: str | Path, folder: str | Path) -> str:
    """How a page in ``folder`` names a file: under the cache root as ``$HETFUSE_CACHE/…``, near the page
    (at most two folders up) relative to it, under the data root or home folder as ``$HETFUSE_DATA/…`` or
    ``~/…``, anywhere else by its file name alone (a relative ``path`` is taken from the current folder)."""
    import os

    p = os.path.abspath(os.path.expanduser(str(path)))
    roots = _roots()
    for root, label in roots:
        if label.startswith("$HETFUSE_CACHE") and (p + os.sep).startswith(root + os.sep):
            return label + p[len(root):].replace(os.sep, "/")
    try:
        rel = os.path.relpath(p, os.path.abspath(folder))
    except ValueError:  # another drive
        rel = None
    if rel is not None and not rel.startswith(os.path.join(os.pardir, os.pardir, os.pardir)):
        return Path(rel).as_posix()
    for root, label in roots:
        if (p + os.sep).startswith(root + os.sep):
            return label + p[len(root):].replace(os.sep, "/")
    return Path(p).name


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
    title, body = scrub_paths(title), scrub_paths(body)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    path = folder / "index.html"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path


def _shown_cell(c, shown: dict[str, str], folder: Path):
    """A cell of a table of the fusion report: an input checkpoint or another absolute path as the page shows
    paths (:func:`display_path`); anything else as it is."""
    import os

    if not isinstance(c, str):
        return c
    if c in shown:
        return shown[c]
    if os.path.isabs(c) and not any(ch.isspace() for ch in c):
        return display_path(c, folder)
    return c


def _cost_meaning(match: str, info: dict, has_costs: bool) -> str:
    if not has_costs:
        if "zip" in match:
            return ("Matching cost: this report holds no zip cost (zip merges neurons by their correlation; newer "
                    "versions report 1 − the correlation of each neuron with those merged with it).")
        return f"Matching cost: {match or 'this matcher'} reports none."
    if info.get("cost_measure"):
        return f"Matching cost ({match}): {info['cost_measure']}."
    return ("Matching cost: the transport (or assignment) cost that each model's neurons paid to reach the "
            "target's, per neuron; the target is matched onto itself, at cost 0.")


def write_fusion_report(folder: str | Path, report: dict, *, accuracy: dict | None = None) -> Path:
    """``folder/index.html`` of one fusion (``report`` as ``hetfuse fuse`` writes it to report.json, with its
    ``figures``). ``accuracy``: ``{"header": [...], "rows": [[...], ...], "note": str}``."""
    from .tables import describe_alignment

    folder = Path(folder)
    cost_fig = plot_matching_costs(report, folder / "matching_cost.png")
    inputs = [str(p) for p in report.get("inputs", ["?"] * report["n_models"])]
    shown = {p: display_path(p, folder) for p in inputs if p != "?"}
    parts = ["<h2>Inputs</h2>",
             _table(["model", "checkpoint", "depth", "hidden widths"],
                    [[i, shown.get(p, p), d, ", ".join(map(str, w))] for i, (p, d, w) in
                     enumerate(zip(inputs, report["depths_in"], report["widths_in"], strict=False))]),
             f'<p class="note">Data: {html.escape(str(report.get("dataset", "")))}; '
             f'{html.escape(str(report.get("alignment_samples", "")))}; '
             f'weights {html.escape(str(report.get("weights")))}; '
             f'target model {report["target"]}; fused hidden widths '
             f'{html.escape(", ".join(map(str, report["fused_widths"])))}. Checkpoints under the cache root are '
             "shown as <code>$HETFUSE_CACHE/…</code>, others relative to this page.</p>",
             "<h2>Configuration</h2>",
             _table(["stage", "method", "parameters"],
                    [[s, st["method"], json.dumps(st.get("params", {}))] for s, st in
                     report["config"]["stages"].items()]),
             "<details><summary>the whole configuration (JSON, as fused.config.json)</summary>"
             f"<pre><code>{html.escape(json.dumps(report['config'], indent=2))}</code></pre></details>"]
    if accuracy:
        rows = [[_shown_cell(c, shown, folder) for c in r] for r in accuracy["rows"]]
        acc = ["<h2>Accuracy</h2>", _table(accuracy["header"], rows)]
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
        match = str((report.get("methods") or {}).get("match", ""))
        info = report.get("match_info") or {}
        costs = info.get("costs") or []
        missing = ("n/a (zip merges by correlation)" if "zip" in match
                   else f"n/a ({match or 'the matcher'} reports no cost)")
        rows = []
        for i, row in enumerate(solvers):
            for s, name in enumerate(row):
                c = costs[i][s] if i < len(costs) and s < len(costs[i]) else None
                rows.append([f"{i} (target)" if i == report.get("target") else i, s + 1, name,
                             f"{c:.4g}" if isinstance(c, (int, float)) else missing])
        parts.append(_table(["model", "neuron space (1-based)", "solver", "matching cost"], rows))
        parts.append(f'<p class="note">{html.escape(_cost_meaning(match, info, bool(costs)))}</p>')
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


def write_barrier_report(folder: str | Path, data: dict, *, figure: str | None = "barrier.png") -> Path:
    """``folder/index.html`` of ``hetfuse barrier … --out DIR``: the two networks (their own loss and error, those of
    the path's endpoints), the loss and error barriers, the curve's figure and table, the alignment's configuration
    and depth alignment. ``data``: the ``barrier.json`` the command writes beside it (a
    :meth:`~hetfuse.barriers.BarrierResult.to_dict` with ``models``, ``dataset``, ``config``)."""
    from .tables import describe_alignment

    folder = Path(folder)
    models = [str(p) for p in data.get("models", ["model A", "model B"])]
    shown = [display_path(p, folder) if p not in ("model A", "model B") else p for p in models]
    ts, loss, err = data["ts"], data["loss"], data["error"]
    fusion = data.get("fusion") or {}
    depths = fusion.get("depths_in") or ["?", "?"]
    widths = fusion.get("widths_in") or [[], []]
    own_loss, own_err = data.get("model_loss") or [None, None], data.get("model_error") or [None, None]

    def num(v, digits=4, scale=1.0):
        return "n/a" if v is None else f"{scale * float(v):.{digits}f}"

    rows = [[f"{'A' if i == 0 else 'B'} (t = {i})", shown[i], depths[i], ", ".join(map(str, widths[i])),
             num(own_loss[i]), num(own_err[i], 2, 100.0), num([loss[0], loss[-1]][i]),
             num([err[0], err[-1]][i], 2, 100.0)] for i in range(2)]
    parts = ["<h2>Networks</h2>",
             _table(["model", "checkpoint", "depth", "hidden widths", "own loss", "own error (%)", "endpoint loss",
                     "endpoint error (%)"], rows),
             f'<p class="note">Measured on {html.escape(str(data.get("dataset", "the data")))}'
             f'{html.escape(" (" + str(data["split"]) + ")" if data.get("split") else "")}, '
             f'{int(data.get("examples", 0))} examples'
             f'{html.escape("; alignment: " + str(data["alignment_samples"]) if data.get("alignment_samples") else "")}'
             '. "Own": the network as given; "endpoint": the network after '
             "depth balancing and alignment (t = 0 and t = 1 of the path), equal to its own where the alignment "
             "moves it exactly (a permutation, identity layers).</p>",
             "<h2>Barriers</h2>",
             _table(["measure", "barrier", "at t"],
                    [["loss (cross-entropy)", num(data["loss_barrier"]), f'{float(data["t_loss"]):.3f}'],
                     ["error (percentage points)", num(data["error_barrier"], 2, 100.0),
                      f'{float(data["t_error"]):.3f}']]),
             '<p class="note">Frankle et al. (2020): barrier = max over t of L(θ_t) − ((1 − t) L(θ_0) + t L(θ_1)), '
             "θ_t = (1 − t) θ_0 + t θ_1 between the aligned, depth-balanced pair, without repair; the same for the "
             f"error. {len(ts)} evenly spaced values of t; neuron matcher "
             f'<code>{html.escape(str(data.get("match", "")))}</code>'
             + (" (vanilla averaging: no alignment)" if data.get("match") == "none" else "") + ".</p>"]
    if figure:
        parts.append(_figures([figure], folder))
    parts += ["<h2>Curve</h2>",
              _table(["t", "loss", "loss − linear", "error (%)", "error − linear (points)"],
                     [[f"{float(t):.3f}", num(lv), num(lv - ((1 - t) * loss[0] + t * loss[-1])), num(ev, 2, 100.0),
                       num(ev - ((1 - t) * err[0] + t * err[-1]), 2, 100.0)]
                      for t, lv, ev in zip(ts, loss, err, strict=True)])]
    config = data.get("config")
    if config:
        parts += ["<h2>Alignment</h2>",
                  _table(["stage", "method", "parameters"],
                         [[s, st["method"], json.dumps(st.get("params", {}))] for s, st in config["stages"].items()])]
        changed = [m for m in fusion.get("mappings", []) if m.get("changed")]
        if changed:
            parts.append("<p>Depth alignment, shallow unit → deep unit (1-based):</p><ul>"
                         + "".join(f"<li>{html.escape(describe_alignment(m))}</li>" for m in changed) + "</ul>")
        else:
            parts.append("<p>The networks have equal depths: no depth alignment.</p>")
    if fusion.get("notes"):
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in fusion["notes"])
                  + "</ul>"]
    parts.append('<p class="note">Raw data: <a href="barrier.json">barrier.json</a>.</p>')
    return write_page(folder, "hetfuse loss barrier", "\n".join(parts))


__all__ = ["display_path", "markdown_to_html", "plot_matching_costs", "scrub_paths", "write_barrier_report",
           "write_experiment_report", "write_fusion_report", "write_page"]
