"""The README runs as written; its method table and its list of the command line's stage and parameter flags are
the registries'."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hetfuse.registry import methods_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_method_table_is_generated_from_the_registries():
    text = README.read_text()
    table = text.split("<!-- methods:begin -->")[1].split("<!-- methods:end -->")[0].strip()
    assert table == methods_markdown(), "regenerate it: hetfuse methods --markdown"


def test_the_command_line_flags_are_generated_from_the_registries():
    from hetfuse.cli import stage_flags_markdown

    block = README.read_text().split("<!-- flags:begin -->")[1].split("<!-- flags:end -->")[0].strip()
    assert block == stage_flags_markdown(), "regenerate it: hetfuse methods --markdown flags"


def test_every_method_of_every_stage_is_in_the_command_line_section():
    from hetfuse.registry import FAMILIES, methods

    section = README.read_text().split("\n## Command line\n")[1].split("\n## ")[0]
    flags = {"similarity": "--representation", "depth_align": "--depth-align", "balance": "--balance",
             "match": "--match", "repair": "--repair"}
    assert set(flags) == set(FAMILIES)
    missing = []
    for family, flag in flags.items():
        line = next((ln for ln in section.splitlines() if ln.startswith(f"- `{flag} ")), None)
        if line is None:
            missing.append(f"{flag}: no line lists its values")
            continue
        values = [v.split(":")[0] for v in line.split("`")[1].split(" ", 1)[1].strip("[]").split("|")]  # fixed:A,B
        missing += [f"{flag} {name}" for name in methods(family) if name not in values]
    assert missing == []


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_every_python_block_of_the_readme_runs(index, tmp_path):
    code = _python_blocks()[index]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
