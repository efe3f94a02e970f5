"""The exact ``convmoe train`` / ``convmoe eval`` commands of a run, rebuilt from its stored config.

A run keeps its resolved config, not the command line that made it. The command is rebuilt as a
recipe file plus the fewest ``key=value`` overrides that turn the recipe into that config, and
the rebuild is verified: ``load_config(recipe, overrides)`` must equal the run's config, or no
command is written. Overrides on a value other keys reference (``data.root``) are preferred to
overrides on every key that copies it.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from convmoe.engine.config import load_config, parse_value

_UNREADABLE = object()
# Trainer settings that change how a run was driven, not what it trains: resuming (exact) and its progress bar.
RUN_CONTROL = ("trainer.resume", "trainer.enable_progress_bar")
# Trainer settings that do not change what ``convmoe eval`` measures: those, where the run wrote and its training
# seed (evaluation is not random).
RUN_BOOKKEEPING = ("trainer.default_root_dir", *RUN_CONTROL, "trainer.seed")
# Sections that only build the model a run trains: ``convmoe eval`` of published weights reads none of them (and a
# run's ``init_from`` names a checkpoint the reader does not have).
MODEL_BUILDING = ("init_from", "init_encoder_from", "patch")


def _without(overrides: Sequence[str], keys: Sequence[str], sections: Sequence[str] = ()) -> list[str]:
    """``overrides`` but those of ``keys``, and of ``sections`` and anything inside them."""
    kept = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key not in keys and not any(key == s or key.startswith(f"{s}.") for s in sections):
            kept.append(override)
    return kept


def _reads_back(text: str) -> Any:
    try:
        return parse_value(text)
    except ValueError:  # not YAML as it stands ("[1"): it needs quoting
        return _UNREADABLE


def format_value(value: Any) -> str:
    """The right-hand side of an override that parses back (as YAML) to ``value``.

    Raises:
        ValueError: A value that no override can express.

    Example:
        >>> format_value(0.0001), format_value("runs/a"), format_value(True), format_value([64, 64])
        ('0.0001', 'runs/a', 'true', '[64, 64]')
        >>> format_value("1"), format_value("[1")
        ('"1"', '"[1"')
    """
    if isinstance(value, str) and "${" not in value and _reads_back(value) == value:
        text = value
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config value {value!r} cannot be written as an override ({error}).") from None
    parsed = _reads_back(text)
    if parsed != value or type(parsed) is not type(value):
        raise ValueError(f"config value {value!r} does not survive an override round trip (it reads back as "
                         f"{parsed!r}); pass the recipe with that value set instead.")
    return text


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def config_diff(base: Any, target: Any, path: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...], Any]]:
    """Leaf differences that turn ``base`` into ``target``: ``(kind, path, value)`` with kind ``"set"``,
    ``"add"`` or ``"remove"``. Lists of equal length are compared item by item, others replaced whole.

    Example:
        >>> config_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 4})
        [('set', ('b', 'c'), 3), ('add', ('d',), 4)]
    """
    if isinstance(base, Mapping) and isinstance(target, Mapping):
        out: list[tuple[str, tuple[str, ...], Any]] = []
        for key, value in target.items():
            if key in base:
                out += config_diff(base[key], value, (*path, str(key)))
            else:
                out.append(("add", (*path, str(key)), value))
        out += [("remove", (*path, str(key)), None) for key in base if key not in target]
        return out
    if isinstance(base, list) and isinstance(target, list) and len(base) == len(target):
        return [d for i, (b, t) in enumerate(zip(base, target, strict=True)) for d in config_diff(b, t, (*path, str(i)))]
    return [] if _same(base, target) else [("set", path, target)]


def _override(kind: str, path: tuple[str, ...], value: Any) -> str:
    dotted = ".".join(path)
    if kind == "remove":
        return f"~{dotted}"
    return f"{'+' if kind == 'add' else ''}{dotted}={format_value(value)}"


def _raw_value(raw: Any, path: tuple[str, ...]) -> Any:
    node = raw
    for part in path:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def recipe_overrides(recipe: str | Path, config: Mapping[str, Any]) -> list[str]:
    """The overrides that make ``recipe`` (a YAML file) load as ``config`` (a run's resolved config).

    Args:
        recipe: The recipe file the run was trained from.
        config: The run's config.

    Returns:
        ``key=value`` / ``+key=value`` / ``~key`` strings for ``convmoe train RECIPE ...``; empty when
        the run used the recipe as is.

    Raises:
        ValueError: No overrides reproduce the config (a value no override can express), or the recipe is
            not a valid YAML mapping.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "r.yaml")
        >>> _ = open(path, "w").write("root: data\\ntrain: {root: '${root}'}\\ntrainer: {seed: 0}\\n")
        >>> recipe_overrides(path, {"root": "/d", "train": {"root": "/d"}, "trainer": {"seed": 1}})
        ['root=/d', 'trainer.seed=1']
    """
    loaded = load_config(recipe)  # first: its errors name the file (not valid YAML, not a mapping)
    raw = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
    raw.pop("defaults", None)
    overrides: list[str] = []
    # First the values written in the recipe itself; the keys that reference them then follow.
    first = [d for d in config_diff(loaded, dict(config))
             if not (isinstance(_raw_value(raw, d[1]), str) and "${" in _raw_value(raw, d[1]))]
    overrides += [_override(*d) for d in first]
    overrides += [_override(*d) for d in config_diff(load_config(recipe, overrides), dict(config))]
    remaining = config_diff(load_config(recipe, overrides), dict(config))
    if remaining:
        raise ValueError(f"no overrides of {recipe} reproduce the run's config (still differing: "
                         f"{['.'.join(d[1]) for d in remaining][:8]}); pass the recipe the run was trained from.")
    return overrides


def display_path(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies inside it (``configs/x.yaml``), else as is.

    Example:
        >>> display_path(os.path.join(os.getcwd(), "configs", "x.yaml"))
        'configs/x.yaml'
    """
    path = Path(path)
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd().resolve())).as_posix() \
            if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    except ValueError:  # another drive on Windows
        return str(path)


def find_recipe(config: Mapping[str, Any], candidates: Sequence[str | Path]) -> tuple[Path, list[str]]:
    """The candidate recipe that reproduces ``config`` with the fewest overrides, and those overrides.

    Raises:
        ValueError: No candidate reproduces it.

    Example:
        >>> find_recipe({"a": 1}, [])
        Traceback (most recent call last):
        ...
        ValueError: no recipe among [] reproduces the run's config; pass the recipe it was trained from with --config.
    """
    best: tuple[int, Path, list[str]] | None = None
    for candidate in candidates:
        try:
            overrides = recipe_overrides(candidate, config)
        except (ValueError, TypeError, KeyError):
            continue
        # A recipe whose model section had to be overridden is another recipe, not this one.
        if any(o.lstrip("+~").startswith("model.") or o.lstrip("+~").startswith("model=") for o in overrides):
            continue
        if best is None or len(overrides) < best[0]:
            best = (len(overrides), Path(candidate), overrides)
    if best is None:
        names = [display_path(c) for c in candidates]
        raise ValueError(f"no recipe among {names} reproduces the run's config; pass the recipe it was trained from "
                         "with --config.")
    return best[1], best[2]


def train_command(recipe: str | Path, overrides: Sequence[str]) -> str:
    """``convmoe train RECIPE OVERRIDES...``, quoted for a POSIX shell, without the overrides of
    :data:`RUN_CONTROL` (how the run was driven).

    Example:
        >>> train_command("configs/a.yaml", ["trainer.seed=1", "data.root=my data", "+trainer.resume=auto"])
        "convmoe train configs/a.yaml trainer.seed=1 'data.root=my data'"
    """
    return shlex.join(["convmoe", "train", display_path(recipe), *_without(overrides, RUN_CONTROL)])


def eval_command(source: str, recipe: str | Path, overrides: Sequence[str], split: str = "val") -> str:
    """``convmoe eval SOURCE OVERRIDES... --config RECIPE``: the published weights on the run's val_dataset
    (or its ``<split>_dataset``). The run's overrides of :data:`RUN_BOOKKEEPING` and :data:`MODEL_BUILDING` are
    left out.

    Example:
        >>> eval_command("convmoe/net", "configs/a.yaml", ["data.root=.data/x"])
        'convmoe eval convmoe/net data.root=.data/x --config configs/a.yaml'
        >>> eval_command("convmoe/net", "configs/a.yaml", [], split="test")
        'convmoe eval convmoe/net --config configs/a.yaml --split test'
    """
    return shlex.join(["convmoe", "eval", source, *_without(overrides, RUN_BOOKKEEPING, MODEL_BUILDING), "--config",
                       display_path(recipe),
                       *(["--split", split] if split != "val" else [])])
