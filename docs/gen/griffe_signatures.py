"""Griffe extension: readable signatures for the package's dataclasses.

Griffe writes the ``__init__`` of a dataclass from its fields, as Python would call them:

- ``losses: dict[str, float] = field(default_factory=lambda: {"switch": 0.01})`` reads
  ``losses = (lambda: {"switch": 0.01})()``, and ``field(default_factory=dict)`` reads ``dict()``.
  The signature shows the value instead: ``losses = {"switch": 0.01}``, ``router_kwargs = {}``.
- The parts of a block (``tokens``, ``router``, ``gate``, ``dispatcher``, ``experts``, ``dropout``)
  are annotated ``Any`` because they take a registered name or a class. A module that maps its part
  fields to registries (``_PART_REGISTRIES`` in ``convmoe.config``) gets those fields shown as
  ``str | type`` (``| None`` where the default is ``None``), as the class docstring documents.

Registered in ``mkdocs.yml`` under the python handler's ``extensions``;
``tests/test_docs.py::test_dataclass_signatures_are_readable`` checks the rendered ``MoEConfig``.
"""

from __future__ import annotations

from typing import Any

from griffe import Class, ExprCall, ExprDict, ExprLambda, ExprName, Extension

# Empty containers a default_factory builds, as their literal.
_EMPTY = {"dict": "{}", "list": "[]", "tuple": "()", "set": "set()"}
PART_FIELDS = "_PART_REGISTRIES"


def factory_value(default: Any) -> Any:
    """The value a ``default_factory`` call builds, as source: the lambda's body or ``{}``/``[]``."""
    if not isinstance(default, ExprCall) or default.arguments:
        return default
    function = default.function
    if isinstance(function, ExprLambda) and not function.parameters:
        return function.body
    if isinstance(function, ExprName) and function.name in _EMPTY:
        return _EMPTY[function.name]
    return default


def part_fields(cls: Class) -> set[str]:
    """The fields that take a part by registered name or class, from the module's registry map."""
    module = cls.module
    mapping = module.members.get(PART_FIELDS)
    value = getattr(mapping, "value", None)
    if not isinstance(value, ExprDict):
        return set()
    return {str(key).strip("'\"") for key in value.keys}


class DataclassDefaults(Extension):
    """Show ``default_factory`` defaults as values and ``Any`` part fields as ``str | type``."""

    def on_class(self, *, cls: Class, **kwargs: Any) -> None:
        if "dataclass" not in cls.labels or "__init__" not in cls.members:
            return
        init = cls.members["__init__"]
        if init.is_alias:
            return
        parts = part_fields(cls)
        for parameter in init.parameters:
            parameter.default = factory_value(parameter.default)
            if parameter.name in parts and str(parameter.annotation) == "Any":
                none = " | None" if str(parameter.default) == "None" else ""
                parameter.annotation = f"str | type{none}"
