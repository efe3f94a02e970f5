"""YAML training configs: loading, ``key=value`` overrides, ``${...}`` references and ``_target_`` instantiation.

A config is plain YAML in the style of Hydra: any mapping with a ``_target_`` (a dotted import
path) is built by calling the target with the mapping's other keys as keyword arguments::

    model:
      _target_: convmoe.models.UPerNetMoE
      encoder_name: tu-efficientnet_lite0
      classes: ${hyperparameters.classes}     # a reference to another value

Overrides use dotted keys: ``trainer.max_epochs=3``; ``+key=value`` adds a key that is not in the
config and ``~key`` removes one (Hydra's syntax). Values are parsed as YAML.

:mod:`convmoe.engine.config_check` checks the shape of a loaded config before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from convmoe.engine.config_names import check_section_names
from convmoe.formatting import did_you_mean

TARGET_KEY = "_target_"
RESERVED_KEYS = ("_target_", "_args_", "_partial_", "_recursive_")
_REFERENCE = re.compile(r"\$\{([^}]+)\}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``; configs write ``1e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."),
)


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """A YAML error in one phrase, with its 1-based line and column when PyYAML knows them.

    Example:
        >>> try:
        ...     yaml.safe_load("a: [1,")
        ... except yaml.YAMLError as error:
        ...     describe_yaml_error(error)
        "expected the node content, but found '<stream end>' at line 1, column 7 (while parsing a flow node)"
    """
    if not isinstance(error, yaml.MarkedYAMLError):
        return " ".join(str(error).split())
    mark = error.problem_mark or error.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = f" ({error.context})" if error.context else ""
    return f"{error.problem or 'invalid YAML'}{where}{context}"


def parse_value(text: str) -> Any:
    """A YAML scalar or flow value, as an override's right-hand side is read.

    Raises:
        ValueError: ``text`` is not valid YAML.

    Example:
        >>> parse_value("1e-4"), parse_value("[1, 2]"), parse_value("null"), parse_value("runs/a")
        (0.0001, [1, 2], None, 'runs/a')
    """
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ValueError(f"{text!r} is not a valid YAML value ({describe_yaml_error(error)}); quote a string that "
                         "holds YAML syntax ('[', '{', ': '), e.g. key='\"a: b\"'.") from None


def _get_path(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for i, part in enumerate(dotted.split(".")):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            where = ".".join(dotted.split(".")[:i]) or "the config"
            options = sorted(node) if isinstance(node, Mapping) else []
            raise KeyError(f"{dotted!r}: {where} has no key {part!r}" + (f"; keys: {options}" if options else ""))
    return node


def _trainer_settings() -> set[str]:
    from convmoe.engine.settings import TrainerSettings

    return {f.name for f in dataclasses.fields(TrainerSettings)}


def _is_trainer_setting(parent: str, key: str) -> bool:
    """Whether ``parent.key`` names a trainer setting (``trainer.resume``), which needs no ``+`` to add."""
    return parent in ("trainer", "pl_trainer") and key in _trainer_settings()


def apply_override(config: dict[str, Any], override: str) -> None:
    """Apply one ``key=value``, ``+key=value`` or ``~key`` override to ``config`` in place.

    A trainer setting the recipe leaves at its default (``trainer.resume=auto``) is added without ``+``.

    Raises:
        ValueError: Malformed override, or a key that does not exist without ``+``.

    Example:
        >>> config = {"trainer": {"max_epochs": 10}}
        >>> apply_override(config, "trainer.max_epochs=2"); apply_override(config, "+seed=1")
        >>> config
        {'trainer': {'max_epochs': 2}, 'seed': 1}
    """
    if override.startswith("~"):
        parent, _, key = override[1:].rpartition(".")
        node = _get_path(config, parent) if parent else config
        if key not in node:
            raise ValueError(f"override {override!r}: no key {override[1:]!r} to remove.")
        del node[key]
        return
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key=value (or +key=value to add, ~key to remove).")
    dotted, _, text = override.partition("=")
    try:
        value = parse_value(text)
    except ValueError as error:
        raise ValueError(f"override {override!r}: {error}") from None
    add = dotted.startswith("+")
    dotted = dotted.lstrip("+").strip()
    parent, _, key = dotted.rpartition(".")
    try:
        node = _get_path(config, parent) if parent else config
    except KeyError as error:
        if not add:
            raise ValueError(f"override {override!r}: {error.args[0]}.") from None
        node = config
        for part in parent.split("."):
            node = node.setdefault(part, {})
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise ValueError(f"override {override!r}: {parent!r} is a list of {len(node)}; use an index below it.")
        node[int(key)] = value
        return
    if key not in node and not add and not _is_trainer_setting(parent, key):
        trainer = parent in ("trainer", "pl_trainer")
        names = set(node) | (_trainer_settings() if trainer else set())
        hint = did_you_mean(dotted, [f"{parent}.{name}" if parent else name for name in sorted(names)])
        fix = f"; trainer settings: {', '.join(sorted(names))}" if trainer else f"; write +{dotted}={text} to add it"
        raise ValueError(f"override {override!r}: no key {dotted!r} in the config{hint}{fix}.")
    node[key] = value


def resolve_references(config: dict[str, Any]) -> dict[str, Any]:
    """Replace every ``${dotted.key}`` with that value (a whole-string reference keeps its type).

    Raises:
        ValueError: A reference to a missing key, or a cycle.

    Example:
        >>> resolve_references({"n": 3, "model": {"classes": "${n}", "name": "net-${n}"}})["model"]
        {'classes': 3, 'name': 'net-3'}
    """

    def resolve(value: Any, stack: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, stack) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, stack) for v in value]
        if not isinstance(value, str) or "${" not in value:
            return value

        def lookup(dotted: str) -> Any:
            dotted = dotted.strip()
            if dotted in stack:
                raise ValueError(f"config references form a cycle: {' -> '.join((*stack, dotted))}.")
            try:
                return resolve(_get_path(config, dotted), (*stack, dotted))
            except KeyError as error:
                raise ValueError(f"config reference ${{{dotted}}}: {error.args[0]}.") from None

        whole = _REFERENCE.fullmatch(value)
        if whole:
            return lookup(whole.group(1))
        return _REFERENCE.sub(lambda m: str(lookup(m.group(1))), value)

    return resolve(config, ())


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A config from a YAML file (or a dict), with overrides applied and references resolved.

    Hydra's ``defaults: [_self_]`` header is accepted and dropped; other config groups are not supported.

    Args:
        source: Path of a YAML file, or a mapping (deep-copied).
        overrides: ``key=value`` strings, applied in order.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not valid YAML or not a mapping, it uses config groups, or an
            override/reference is invalid.

    Example:
        >>> load_config({"lr": 0.1, "optimizer": {"lr": "${lr}"}}, ["lr=0.5"])["optimizer"]
        {'lr': 0.5}
    """
    if isinstance(source, Mapping):
        config = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist.")
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config {path} is not valid YAML: {describe_yaml_error(error)}; fix the file there."
                             ) from None
        except UnicodeDecodeError:
            raise ValueError(f"config {path} is not a UTF-8 text file; pass a YAML training config.") from None
        if not isinstance(config, dict):
            # ValueError like the other bad-file cases: callers (the CLI) handle one kind of bad input.
            raise ValueError(f"config {path} must be a YAML mapping at the top level (key: value lines), got "  # noqa: TRY004
                             f"{type(config).__name__}; start the file with a section such as 'model:'.")
    defaults = config.pop("defaults", ["_self_"])
    if defaults not in (["_self_"], [], None):
        raise ValueError(f"config 'defaults: {defaults}' uses Hydra config groups, which convmoe does not compose; "
                         "write the groups' contents into one file and keep only 'defaults: [_self_]'.")
    for override in overrides:
        apply_override(config, override)
    check_section_names(config)
    return resolve_references(config)


class InstantiationError(TypeError, ValueError):
    """A ``_target_`` rejected the arguments the config gives it (a misspelt or missing key, as a rule).

    A TypeError, as the call raised; also a ValueError, the kind of error a bad config raises
    everywhere else, so that the command line reports it as one.

    Example:
        >>> instantiate({"_target_": "torch.nn.Linear", "in_feature": 2})
        Traceback (most recent call last):
        ...
        convmoe.engine.config.InstantiationError: building torch.nn.Linear: Linear.__init__() got an unexpected keyword argument 'in_feature'; fix the keys of that _target_ in the config.
    """


def locate(path: str) -> Any:
    """The object a dotted import path names (``torch.optim.AdamW``).

    Raises:
        ValueError: Nothing importable by that name.

    Example:
        >>> locate("torch.nn.CrossEntropyLoss").__name__
        'CrossEntropyLoss'
    """
    if not isinstance(path, str) or not path or path.startswith(".") or path.endswith("."):
        raise ValueError(f"_target_={path!r} must be a dotted import path such as 'torch.optim.AdamW'.")
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and not module_name.startswith(error.name):
                raise  # the module exists but one of its own imports failed: show that error
            continue
        for i, attribute in enumerate(parts[split:], start=split):
            if not hasattr(obj, attribute):
                raise ValueError(f"cannot locate _target_ {path!r}: {'.'.join(parts[:i])!r} has no attribute "
                                 f"{attribute!r}.")
            obj = getattr(obj, attribute)
        return obj
    raise ValueError(f"cannot locate _target_ {path!r}: no module {parts[0]!r} is installed.")


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the objects a config node describes.

    A mapping with ``_target_`` becomes ``target(*_args_, *args, **fields, **kwargs)``, its fields
    built first (unless ``_recursive_: false``); ``_partial_: true`` returns a
    ``functools.partial`` instead. Lists and plain mappings are built element by element; other
    values pass through.

    Raises:
        ValueError: A target that cannot be located.
        InstantiationError: The target rejected the arguments (a TypeError and a ValueError; the
            message names the target).

    Example:
        >>> instantiate({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}).out_features
        3
        >>> instantiate([{"_target_": "builtins.dict", "a": 1}, 5])
        [{'a': 1}, 5]
    """
    if isinstance(node, list):
        return [instantiate(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    if TARGET_KEY not in node:
        return {key: instantiate(value) for key, value in node.items()}
    target = locate(node[TARGET_KEY])
    recursive = node.get("_recursive_", True)
    fields = {k: (instantiate(v) if recursive else v) for k, v in node.items() if k not in RESERVED_KEYS}
    positional = [instantiate(a) if recursive else a for a in node.get("_args_", [])]
    fields.update(kwargs)
    if node.get("_partial_", False):
        return functools.partial(target, *positional, *args, **fields)
    try:
        return target(*positional, *args, **fields)
    except InstantiationError:
        raise
    except (TypeError, ValueError) as error:  # keys it does not take, or values it refuses (a negative lr)
        what = "keys" if isinstance(error, TypeError) else "values"
        raise InstantiationError(f"building {node[TARGET_KEY]}: {error}; fix the {what} of that _target_ in the "
                                 "config.") from error
