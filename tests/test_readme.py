"""The README runs as written and its method table is the registries'."""

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


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_every_python_block_of_the_readme_runs(index, tmp_path):
    code = _python_blocks()[index]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
