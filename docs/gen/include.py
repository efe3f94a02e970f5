"""Include a repository file in a page: ``<!-- include: benchmarks/README.md -->``.

The site shows files that are generated elsewhere and must not be copied by hand: the benchmark
tables (``benchmarks/README.md``) and the zoo index (``zoo/README.md``, written by ``convmoe zoo
table`` from the model cards). The hook in ``docs/gen/hooks.py`` replaces each marker with the file
at build time, so the page and the file cannot disagree. The file's title is dropped (the page has
its own), and so are HTML comments; links relative to the file's folder would point nowhere on the
site, so they keep their text only. A missing file fails the build.

Used by ``docs/gen/hooks.py`` and by ``tests/test_docs.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = re.compile(r"<!--\s*include:\s*(?P<path>[^\s>]+)\s*-->")
# [text](target) whose target is relative: no scheme, not an anchor, not site-absolute.
_RELATIVE_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?![a-zA-Z][a-zA-Z0-9+.-]*:|#|/)[^)\s]+\)")
_HTML_COMMENT = re.compile(r"<!--.*?-->[ \t]*\n?", re.DOTALL)


def included(path: Path) -> str:
    """The Markdown of ``path`` as a page shows it: no title, no comments, relative links as text.

    Raises:
        FileNotFoundError: The file does not exist.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the documentation includes it (generate it first).")
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    text = _HTML_COMMENT.sub("", "\n".join(lines))
    return _RELATIVE_LINK.sub(r"\g<text>", text).strip() + "\n"


def expand(markdown: str, root: Path) -> str:
    """Replace every include marker of ``markdown`` with the file it names (relative to ``root``)."""
    return MARKER.sub(lambda match: included(root / match["path"]), markdown)


def variant_names(zoo_dir: Path) -> list[str]:
    """The zoo's variant folders (those holding a model card), sorted."""
    if not zoo_dir.is_dir():
        return []
    return sorted(card.parent.name for card in zoo_dir.glob("*/README.md"))
