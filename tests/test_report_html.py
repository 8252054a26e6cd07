"""HTML reports: the markdown converter, and the pages of `fuse --report` and of an experiment rendered in headless
Chromium (DevTools protocol): every image loads, the page logs no error, a screenshot is saved.

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


def render(page: Path, screenshot: Path, timeout: float = 60.0) -> dict:
    """Load ``page`` in headless Chromium; returns {"images": [{src, ok}], "errors": [...]} and writes a
    full-page PNG screenshot."""
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
        call("Page.navigate", url=page.resolve().as_uri())
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            if time.time() > deadline:
                raise RuntimeError("the page did not finish loading")
            events.append(json.loads(ws.recv()))
        images = call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
            "ok: i.complete && i.naturalWidth > 0}))"))["result"]["value"]
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
        return {"images": images, "errors": errors}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _check_rendered(page: Path, tmp_path: Path, min_images: int) -> dict:
    shot = tmp_path / "screenshot.png"
    res = render(page, shot)
    assert len(res["images"]) >= min_images, res
    assert all(i["ok"] for i in res["images"]), [i for i in res["images"] if not i["ok"]]
    assert res["errors"] == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    return res


# ---------------------------------------------------------------------------------------------- markdown

def test_markdown_to_html_converts_the_summary_subset():
    text = ("# Title\n\nSome `code` and **bold** <b>raw</b>.\nSame paragraph.\n\n| a | b |\n|---|---|\n| 1 | x |\n"
            "| 2 | y |\n\n- one\n  continued\n- two\n\n```\nls -l <dir>\n```\n")
    out = markdown_to_html(text, shift=1)
    assert "<h2>Title</h2>" in out
    assert "<p>Some <code>code</code> and <strong>bold</strong> &lt;b&gt;raw&lt;/b&gt;. Same paragraph.</p>" in out
    assert "<thead><tr><th>a</th><th>b</th></tr></thead>" in out and out.count("<tr>") == 3
    assert "<li>one continued</li><li>two</li>" in out
    assert "<pre><code>ls -l &lt;dir&gt;</code></pre>" in out


# ---------------------------------------------------------------------------------------------- rendering

def test_the_checker_sees_a_missing_image_and_a_script_error(tmp_path):
    page = write_page(tmp_path / "bad", "broken", '<img src="missing.png"><script>undefinedFunction()</script>')
    res = render(page, tmp_path / "shot.png")
    assert res["images"] == [{"src": "missing.png", "ok": False}]
    assert res["errors"]  # the failed load and the exception


def test_fuse_report_renders(tmp_path):
    from hetfuse.cli import main

    a, b = train_digits_pair(tmp_path)
    common = ["--dataset", "digits", "--quiet"]
    rep = tmp_path / "report"
    assert main(["fuse", str(a), str(b), "--out", str(tmp_path / "f.safetensors"), "--report", str(rep),
                 "--samples", "200"] + common) == 0
    text = (rep / "index.html").read_text()
    for part in ("Configuration", "Depth alignment", "Neuron matching", "Accuracy", "ensemble", "fused"):
        assert part in text
    data = json.loads((rep / "report.json").read_text())
    assert [r[0] for r in data["accuracy"]["rows"]][-1] == "fused"
    _check_rendered(rep / "index.html", tmp_path, min_images=2)  # the alignment matrix and the matching costs


def test_experiment_report_renders(tmp_path):
    from hetfuse.data import load_dataset
    from hetfuse.experiments import run_skill_transfer

    out = tmp_path / "st"
    run_skill_transfer(seeds=[0], out_dir=out, epochs=1, samples=50, progress=False, dataset=load_dataset("digits"),
                       hidden_a=[24, 16], hidden_b=[24, 20, 12], cache=tmp_path / "cache", command="hetfuse x")
    page = write_experiment_report(out)
    text = page.read_text()
    assert "<table>" in text and "fig4.png" in text and "hetfuse x" in text and "results.csv" in text
    _check_rendered(page, tmp_path, min_images=1)


def test_an_experiment_page_links_a_fusion_report_it_holds_and_does_not_redraw_it(tmp_path):
    (tmp_path / "summary.md").write_text("# An experiment\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    sub = tmp_path / "fusion_split0"
    sub.mkdir()
    (sub / "report.json").write_text(json.dumps({"mappings": [{"groups": [{"matrix": [[1.0, 0.0], [0.0, 1.0]]}]}]}))
    (sub / "index.html").write_text("<html></html>")
    text = write_experiment_report(tmp_path).read_text()
    assert 'href="fusion_split0/index.html"' in text
    assert not (sub / "alignment").exists()
