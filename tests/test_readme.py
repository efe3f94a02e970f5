"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_quickstart_runs(capsys):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no python block"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README is ours
    assert "util.entropy" in capsys.readouterr().out


def test_readme_names_the_test_command():
    text = README.read_text()
    assert 'pip install -e ".[dev]" && pytest -x -q' in text
    assert "pytest -x -q" in (README.parent / ".ci" / "run").read_text()
