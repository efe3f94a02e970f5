"""Griffe extension: render the docstrings' Sphinx roles as cross-references.

The docstrings name other objects the Sphinx way (``:class:`~convmoe.routers.Router```, ``:func:``,
``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, ``:exc:``, ``:obj:``), which Markdown would print as
text. Before a docstring is parsed, each role becomes an autorefs cross-reference:

- ``:class:`~convmoe.routers.Router``` becomes ``[`Router`][convmoe.routers.Router]`` (``~`` shows the
  last name only), ``:class:`convmoe.routers.Router``` shows the whole path, and
  ``:func:`Title <convmoe.patch>``` shows the title. Functions and methods show ``()`` after the name.
- A relative name (``:class:`Router```, ``:meth:`Trainer.fit```) is resolved the way Python would
  see it from the docstring's object: its members, its module's names and imports, then the parents.

A name griffe cannot resolve is logged as a warning, so ``mkdocs build --strict`` fails on it. An
exported target (a function, class or attribute in its module's ``__all__``, which the reference
must document) that no page documents fails the strict build too (autorefs reports the unknown
reference). Any other target (a module, a method, a helper outside ``__all__``) is a link when a
page documents it and code otherwise. Registered in ``mkdocs.yml`` under the python handler's ``extensions``; the test
``tests/test_docs.py::test_no_raw_sphinx_roles`` checks the built site holds no role as text.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

from griffe import Extension, Object

# mkdocs counts the warnings of its own loggers; --strict fails on any of them.
_log = logging.getLogger("mkdocs.plugins.convmoe_docs.roles")

ROLE = re.compile(
    r":(?P<role>class|func|meth|mod|data|attr|exc|obj|const|type):"
    r"`(?:(?P<title>[^`<]+?)\s*<(?P<target_t>[^`>]+)>|(?P<tilde>~?)(?P<target>[^`\s]+))`"
)
_CALLABLE = {"func", "meth"}


def _lookup(obj: Object, path: str) -> Any:
    """The object at the absolute dotted ``path`` in ``obj``'s modules collection, or None."""
    try:
        return obj.modules_collection[path]
    except Exception:  # noqa: BLE001 (KeyError, alias resolution errors: all mean "not found")
        return None


def _exported(target: Any) -> bool:
    """Whether ``target`` is a function, class or attribute that its module or a package above it
    lists in ``__all__`` (the API reference must document those)."""
    module = target.parent
    if target.is_module or module is None or not module.is_module:
        return False  # modules, methods and class attributes: pages document some, not all
    while module is not None:
        if target.name in (module.exports or ()):
            return True
        module = module.parent
    return False


def _found(obj: Object, path: str) -> tuple[str, bool] | None:
    """(canonical path, public?) of the object at ``path``, or None when there is none."""
    target = _lookup(obj, path)
    if target is None:
        return None
    try:
        # The canonical path (convmoe.unpatch -> convmoe.patch.unpatch.unpatch): autorefs knows
        # every rendered object by it, whichever of its paths a page renders.
        return target.canonical_path, _exported(target)
    except Exception:  # noqa: BLE001 (an alias that does not resolve: keep the path as written)
        return path, True


def resolve(obj: Object, name: str) -> tuple[str, bool] | None:
    """(path, public?) of what ``name`` refers to, seen from ``obj``'s docstring; None when unknown."""
    name = name.lstrip(".")
    if (found := _found(obj, name)) is not None:  # already absolute
        return found
    head, _, rest = name.partition(".")
    scope: Any = obj
    while scope is not None:
        try:
            base = scope.resolve(head)
        except Exception:  # noqa: BLE001 (NameResolutionError and alias errors)
            base = None
        if base is not None and (found := _found(obj, f"{base}.{rest}" if rest else base)) is not None:
            return found
        scope = scope.parent
    return None


def convert(obj: Object, text: str, where: str) -> str:
    """``text`` with every Sphinx role replaced by an autorefs cross-reference."""

    def replace(match: re.Match[str]) -> str:
        written = match["target_t"] or match["target"]
        found = resolve(obj, written)
        if found is None:
            _log.warning(
                "%s: the docstring's %s cannot be resolved to a convmoe object "
                "(qualify the name, or write it as `code`)",
                where,
                match[0],
            )
            return f"`{written}`"
        if match["title"]:
            shown = match["title"]
        else:
            shown = written.rsplit(".", 1)[-1] if match["tilde"] else written
            if match["role"] in _CALLABLE:
                shown += "()"
        path, public = found
        if public:
            return f"[`{shown}`][{path}]"  # a public object must be documented: unknown fails --strict
        # A private helper (not in its module's __all__) may have no page: a link when it has one,
        # else code (autorefs' optional reference, as mkdocstrings writes for signatures).
        return f'<autoref identifier="{path}" optional><code>{html.escape(shown)}</code></autoref>'

    return ROLE.sub(replace, text)


class SphinxRoles(Extension):
    """Turn ``:role:`target``` in docstrings into ``[`target`][resolved.path]`` cross-references."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None or ":`" not in docstring.value:
            return
        where = f"{obj.path} ({obj.relative_filepath}:{docstring.lineno})"
        docstring.value = convert(obj, docstring.value, where)
