"""The package's layering (STYLE.md 10c) and module sizes: the contracts of pyproject.toml hold."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400


def test_import_contracts_hold():
    """core <- patch <- hub <- models | data | pretrained <- engine <- analysis <- zoo | demo <- cli, and no
    cycle inside the outer packages; imports inside functions count too (lint-imports in .ci/run)."""
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extra")
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_engine_does_not_import_analysis():
    """The trainer takes the routing tracker as a callback (named by ``trainer.routing_tracker``)."""
    grimp = pytest.importorskip("grimp", reason="import-linter's graph library is in the dev extra")
    graph = grimp.build_graph("convmoe")
    assert not graph.chain_exists(importer="convmoe.engine", imported="convmoe.analysis", as_packages=True)


def test_no_module_is_over_400_lines():
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in (ROOT / "convmoe").rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
