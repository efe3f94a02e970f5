"""Griffe extension: render the package's docstrings as written.

- ``Example:`` sections. The docstrings title their examples ``Example:`` (the style guide's
  spelling). Griffe's Google parser knows only ``Examples:`` as a section and renders any other
  ``Title:`` as an admonition of Markdown text, where ``>>>`` lines turn into nested block quotes.
  The title is renamed before the docstring is parsed, so examples render as ``pycon`` code.
- reStructuredText literal markers. A paragraph ending in ``::`` introduces an indented block,
  which Markdown already shows as code; the marker itself would print as ``::``, so it becomes ``:``.

Registered in ``mkdocs.yml`` under the python handler's ``extensions``.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE_TITLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_LITERAL_MARKER = re.compile(r"(?<=\S)::[ \t]*\n(?=[ \t]*\n)")


class ExampleSections(Extension):
    """Rename ``Example:`` section titles to ``Examples:`` and drop reST ``::`` literal markers."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        text = _EXAMPLE_TITLE.sub(r"\g<indent>Examples:", docstring.value)
        docstring.value = _LITERAL_MARKER.sub(":\n", text)
