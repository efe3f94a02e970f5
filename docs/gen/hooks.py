"""MkDocs hooks: include generated repository files in pages (see ``docs/gen/include.py``).

Registered in ``mkdocs.yml`` under ``hooks:``. ``docs/benchmarks.md`` includes ``benchmarks/README.md``
and ``docs/zoo.md`` includes ``zoo/README.md`` (the index ``convmoe zoo table`` writes from the cards).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    # Loaded by path: docs/gen is not a package, and mkdocs loads this hook file by path too.
    spec = importlib.util.spec_from_file_location(f"convmoe_docs_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


include = _load("include")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace every ``<!-- include: PATH -->`` marker with the file, PATH relative to the repository."""
    return include.expand(markdown, Path(config["config_file_path"]).resolve().parent)
