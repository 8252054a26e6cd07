"""HTML reports: the markdown converter, and the pages of `fuse --report` and of an experiment rendered in headless
Chromium (DevTools protocol): every image loads, the page logs no error, no table (nor anything else) makes the
page wider than the window, at a desktop and at a narrow window width; no absolute home or cache path is in the
page; a screenshot is saved.

Chromium is the Debian package ``chromium`` (``.ci/run`` installs it); without it these rendering tests skip,
unless ``HETFUSE_REQUIRE_CHROMIUM=1`` (set by CI) makes a missing browser a failure."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import train_digits_pair
from hetfuse.report.html import markdown_to_html, write_experiment_report, write_page


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("HETFUSE_REQUIRE_CHROMIUM") == "1":
        pytest.fail("chromium is not installed (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


# Per table, the box that must fit the window: the table itself, or the nearest ancestor that scrolls (or clips) it
# sideways; and the width of the page's content against the window's.
_LAYOUT_JS = """(() => {
  const W = document.documentElement.clientWidth;
  const tables = Array.from(document.querySelectorAll('table')).map((t, k) => {
    let box = t;
    for (let e = t.parentElement; e && e !== document.body; e = e.parentElement) {
      const o = getComputedStyle(e).overflowX;
      if (o === 'auto' || o === 'scroll' || o === 'hidden' || o === 'clip') { box = e; break; }
    }
    const r = box.getBoundingClientRect();
    return {index: k, left: r.left, right: r.right, width: r.width, table_width: t.getBoundingClientRect().width,
            head: (t.rows[0] ? t.rows[0].innerText : '').slice(0, 80)};
  });
  return {client_width: W, inner_width: window.innerWidth, scroll_width: document.documentElement.scrollWidth,
          body_scroll_width: document.body.scrollWidth, tables: tables};
})()"""


def render(page: Path, screenshot: Path, timeout: float = 60.0, width: int = 1280) -> dict:
    """Load ``page`` in headless Chromium with a window ``width`` CSS pixels wide; returns {"images": [{src, ok}],
    "errors": [...], "layout": {client_width, scroll_width, tables: [{left, right, ...}]}} and writes a full-page
    PNG screenshot."""
    import websocket

    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))  # fresh: no stale DevToolsActivePort
    proc = subprocess.Popen([_browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1280,1000",
                             f"--user-data-dir={profile}", "--allow-file-access-from-files", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        ids = iter(range(1, 10_000))
        events: list[dict] = []

        def call(method, **params):
            i = next(ids)
            ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == i:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg.get("result", {})
                events.append(msg)

        for domain in ("Page", "Runtime", "Log"):
            call(f"{domain}.enable")
        call("Emulation.setDeviceMetricsOverride", width=width, height=1000, deviceScaleFactor=1, mobile=False)
        call("Page.navigate", url=page.resolve().as_uri())
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            if time.time() > deadline:
                raise RuntimeError("the page did not finish loading")
            events.append(json.loads(ws.recv()))
        images = call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
            "ok: i.complete && i.naturalWidth > 0, scale: i.naturalWidth ? i.width / i.naturalWidth : 0}))"
        ))["result"]["value"]
        layout = call("Runtime.evaluate", returnByValue=True, expression=_LAYOUT_JS)["result"]["value"]
        shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = []
        for e in events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(str(p.get("args")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(p["entry"].get("text"))
        ws.close()
        return {"images": images, "errors": errors, "layout": layout}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def overflowing(layout: dict) -> list[dict]:
    """The tables (each with its scroll container, if any) that reach past the window's right edge, and the page
    itself if its content is wider than the window."""
    w = layout["client_width"]
    bad = [t for t in layout["tables"] if t["right"] > w + 0.5 or t["left"] < -0.5]
    if layout["scroll_width"] > w or layout["body_scroll_width"] > w:
        bad.append({"page": {k: layout[k] for k in ("client_width", "scroll_width", "body_scroll_width")}})
    return bad


def machine_paths(tmp_path: Path) -> list[str]:
    """Absolute paths of this machine that a page must not show: home folders, the cache root, the test's own
    folder (every file of the test lies under it)."""
    from hetfuse.cache import cache_root

    home = str(Path.home())
    found = ["/root/", "/home/", str(cache_root()), str(tmp_path)]
    return found + ([home + "/"] if len(home) > 1 else [])


def _check_rendered(page: Path, tmp_path: Path, min_images: int) -> dict:
    text = page.read_text()
    leaked = [p for p in machine_paths(tmp_path) if p in text]
    assert leaked == [], f"absolute paths of this machine in {page.name}: {leaked}"
    for width in (1280, 760):  # a desktop window, and a narrow one
        shot = tmp_path / f"screenshot_{width}.png"
        res = render(page, shot, width=width)
        assert len(res["images"]) >= min_images, res
        assert all(i["ok"] for i in res["images"]), [i for i in res["images"] if not i["ok"]]
        if width >= 1280:  # a figure (and its legend) is not shrunk to an unreadable size on a desktop window
            assert all(i["scale"] >= 0.75 for i in res["images"]), res["images"]
        assert res["errors"] == []
        assert res["layout"]["inner_width"] == width, res["layout"]  # (client_width: less the scroll bar)
        assert res["layout"]["tables"], "no table on the page"
        assert overflowing(res["layout"]) == [], f"wider than a {width}px window: {overflowing(res['layout'])}"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    return res


# ---------------------------------------------------------------------------------------------- markdown

def test_markdown_to_html_converts_the_summary_subset():
    text = ("# Title\n\nSome `code` and **bold** <b>raw</b>.\nSame paragraph.\n\n| a | b |\n|---|---|\n| 1 | x |\n"
            "| 2 | y |\n\n- one\n  continued\n- two\n\n```\nls -l <dir>\n```\n")
    out = markdown_to_html(text, shift=1)
    assert "<h2>Title</h2>" in out
    assert "<p>Some <code>code</code> and <strong>bold</strong> &lt;b&gt;raw&lt;/b&gt;. Same paragraph.</p>" in out
    assert '<div class="table-wrap"><table><thead><tr><th class="nw">a</th><th class="nw">b</th></tr></thead>' in out
    assert out.count("<tr>") == 3 and '<td class="nw">x</td>' in out  # a short cell does not wrap
    assert "<li>one continued</li><li>two</li>" in out
    assert "<pre><code>ls -l &lt;dir&gt;</code></pre>" in out


# ---------------------------------------------------------------------------------------------- rendering

def test_the_checker_sees_a_missing_image_and_a_script_error(tmp_path):
    page = write_page(tmp_path / "bad", "broken", '<img src="missing.png"><script>undefinedFunction()</script>')
    res = render(page, tmp_path / "shot.png")
    assert [(i["src"], i["ok"]) for i in res["images"]] == [("missing.png", False)]
    assert res["errors"]  # the failed load and the exception


def test_the_checker_sees_a_table_wider_than_the_window_and_a_machine_path(tmp_path):
    cells = "".join(f"<td>{k}.00 ± 0.00</td>" for k in range(30))
    page = tmp_path / "wide" / "index.html"
    page.parent.mkdir()
    page.write_text(f"<!DOCTYPE html><html><body><table><tr>{cells}</tr></table><p>{tmp_path}/a.pt</p></body></html>")
    res = render(page, tmp_path / "shot.png", width=760)
    assert overflowing(res["layout"])
    with pytest.raises(AssertionError, match="absolute paths"):
        _check_rendered(page, tmp_path, min_images=0)


def test_every_figure_legend_is_readable(tmp_path, monkeypatch):
    """Every legend of the report's figures: at least 8 pt (at the DPI the figure is saved with)."""
    from hetfuse.report import figures

    plt = figures._plt()
    seen = []

    class Recording:
        def __getattr__(self, name):
            return getattr(plt, name)

        @staticmethod
        def close(fig):
            seen.append(fig)
            plt.close(fig)

    monkeypatch.setattr(figures, "_plt", lambda: Recording())
    figures.plot_matrix([[0.1, 0.9], [0.5, 0.2], [0.8, 0.3]], {"cla": [0, 2], "sma": [0, 1]}, tmp_path / "m.png")
    figures.plot_weight_sweep([0.0, 0.5, 1.0], {"p": {"a": [(1, 0), (2, 1), (3, 0)]}, "q": {"a": [(1, 0)] * 3}},
                              {"model A": 2.0}, tmp_path / "w.png")
    report = {"target": 0, "match_info": {"costs": [[0.0, 0.0], [1.5, 2.0]]}}
    assert figures.plot_matching_costs(report, tmp_path / "c.png") == "c.png"
    assert len(seen) == 3
    legends = [leg for fig in seen for leg in fig.legends + [ax.get_legend() for ax in fig.axes] if leg]
    assert len(legends) == 3
    assert min(t.get_fontsize() for leg in legends for t in leg.get_texts()) >= 8
    labels = [t.get_text() for t in legends[-1].get_texts()]
    assert labels[0].startswith("model 0 (target)"), labels  # the target is in the cost chart, at cost 0


@pytest.fixture
def cache_in_tmp(tmp_path, monkeypatch) -> Path:
    """The cache root moved into the test's folder (``$HETFUSE_CACHE``), as ``~/.cache/hetfuse`` is by default."""
    from hetfuse.cache import cache_root

    monkeypatch.setenv("HETFUSE_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    return cache_root()


@pytest.mark.parametrize("match", ["ot-acts", "elastic-zip"])
def test_fuse_report_renders(tmp_path, cache_in_tmp, match):
    from hetfuse.cli import main

    a, b = train_digits_pair(cache_in_tmp / "models")  # inputs in the cache, as the experiments' models are
    common = ["--dataset", "digits", "--quiet", "--match", match]
    rep = tmp_path / "report"
    assert main(["fuse", str(a), str(b), "--out", str(tmp_path / "f.safetensors"), "--report", str(rep),
                 "--samples", "200"] + common) == 0
    text = (rep / "index.html").read_text()
    for part in ("Configuration", "Depth alignment", "Neuron matching", "Accuracy", "ensemble", "fused"):
        assert part in text
    assert "$HETFUSE_CACHE/models/a.safetensors" in text
    data = json.loads((rep / "report.json").read_text())
    assert [r[0] for r in data["accuracy"]["rows"]][-1] == "fused"
    costs = data["match_info"]["costs"]  # every matcher here reports a cost per model and neuron space
    assert [len(r) for r in costs] == [len(r) for r in data["solvers"]]
    assert ">n/a (" not in text and "matching_cost.png" in text
    if match == "elastic-zip":  # 1 − correlation with the neurons zipped together: every model pays some
        assert all(0 < c < 2 for row in costs for c in row), costs
    else:  # the target is matched onto itself at cost 0; its bars are still drawn and labelled
        assert costs[data["target"]] == [0.0] * len(costs[data["target"]])
    _check_rendered(rep / "index.html", tmp_path, min_images=2)  # the alignment matrix and the matching costs


def test_experiment_report_renders(tmp_path, cache_in_tmp):
    from hetfuse.data import load_dataset
    from hetfuse.experiments import run_skill_transfer

    out = tmp_path / "st"
    command = f"hetfuse x --data-root {Path.home() / 'data'} --cache {cache_in_tmp}"  # as typed, absolute paths
    run_skill_transfer(seeds=[0], out_dir=out, epochs=1, samples=50, progress=False, dataset=load_dataset("digits"),
                       hidden_a=[24, 16], hidden_b=[24, 20, 12], cache=True, command=command)
    page = write_experiment_report(out)
    text = page.read_text()
    assert "<table>" in text and "fig4.png" in text and "hetfuse x" in text and "results.csv" in text
    assert "--cache $HETFUSE_CACHE" in text and ("--data-root ~/data" in text or len(str(Path.home())) <= 1)
    res = _check_rendered(page, tmp_path, min_images=1)
    wb = [t for t in res["layout"]["tables"] if "0.7" in t["head"] and "1.0" in t["head"]]
    assert wb, res["layout"]["tables"]  # the table of the wB sweep (0.0 … 1.0) is there, and fits


def test_paths_in_a_page_are_relative_or_named_by_their_root(tmp_path, cache_in_tmp):
    from hetfuse.report.html import display_path, scrub_paths

    page = tmp_path / "results" / "report"
    assert display_path(cache_in_tmp / "models" / "m.safetensors", page) == "$HETFUSE_CACHE/models/m.safetensors"
    assert display_path(tmp_path / "results" / "a.safetensors", page) == "../a.safetensors"
    assert display_path(page / "x" / "b.pt", page) == "x/b.pt"
    assert display_path("/opt/far/away/c.pt", page) == "c.pt"
    home = Path.home()
    text = (f"<td>{home}/x.pt</td> `{cache_in_tmp}/models` /home/someone/.cache/hetfuse/models/y "
            "/home/someone/z.pt pytest-of-root/ https://example.com/home/page /root/.cache/hetfuse/w /root")
    out = scrub_paths(text)  # another machine's paths (text written there) too: its default cache root, its home
    assert "$HETFUSE_CACHE/models` $HETFUSE_CACHE/models/y ~/z.pt pytest-of-root/ https://example.com/home/page" \
        in out, out
    assert str(cache_in_tmp) not in out and "/root/" not in out and "/home/someone" not in out
    if len(str(home)) > 1:
        assert "<td>~/x.pt</td>" in out and f"{home}/" not in out


def test_an_experiment_page_links_a_fusion_report_it_holds_and_does_not_redraw_it(tmp_path):
    (tmp_path / "summary.md").write_text("# An experiment\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    sub = tmp_path / "fusion_split0"
    sub.mkdir()
    (sub / "report.json").write_text(json.dumps({"mappings": [{"groups": [{"matrix": [[1.0, 0.0], [0.0, 1.0]]}]}]}))
    (sub / "index.html").write_text("<html></html>")
    text = write_experiment_report(tmp_path).read_text()
    assert 'href="fusion_split0/index.html"' in text
    assert not (sub / "alignment").exists()
