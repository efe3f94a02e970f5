"""Checks of a training config's shape, before anything is built.

:func:`check_training_config` checks sections that must be mappings, ``_target_`` nodes,
``data_loader`` settings and (given a settings dataclass such as the engine's ``TrainerSettings``)
the types of the ``trainer`` values, so that a wrong value is named in one sentence instead of
failing deep inside the loop.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader

from convmoe.config import MoEConfig
from convmoe.engine.config import TARGET_KEY
from convmoe.formatting import did_you_mean

# Sections built from a ``_target_``, with a target to show in the fix.
_TARGET_SECTIONS = {"model": "convmoe.models.create_classifier", "loss": "torch.nn.CrossEntropyLoss",
                    "optimizer": "torch.optim.AdamW", "init_encoder_from": "convmoe.pretrained.load_efficientnet_lite0"}
_SETTINGS_SECTIONS = ("trainer", "pl_trainer", "data_loader")
# DataLoader settings a config may give: their types, and an example value for the fix.
DATA_LOADER_SETTINGS: dict[str, tuple[Any, Any]] = {
    "batch_size": (int | None, 8), "shuffle": (bool | None, True), "num_workers": (int, 4),
    "pin_memory": (bool, True), "drop_last": (bool, True), "timeout": (float, 0),
    "prefetch_factor": (int | None, 2), "persistent_workers": (bool, True),
}
# DataLoader arguments the engine passes itself (a config giving them would collide).
_ENGINE_LOADER_ARGUMENTS = ("dataset", "sampler", "generator")


def _type_names(hint: Any) -> list[str]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [name for arg in typing.get_args(hint) for name in _type_names(arg)]
    if hint is type(None) or hint is None:
        return ["null"]
    names = {bool: "a bool", int: "an int", float: "a float", str: "a string", list: "a list", dict: "a mapping"}
    return [names.get(typing.get_origin(hint) or hint, f"a {getattr(hint, '__name__', hint)}")]


def describe_type(hint: Any) -> str:
    """A type hint in words, as error messages say it.

    Example:
        >>> describe_type(int | float | None), describe_type(str)
        ('an int, a float or null', 'a string')
    """
    names = list(dict.fromkeys(_type_names(hint)))
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def matches_type(value: Any, hint: Any) -> bool:
    """Whether a config value fits a simple type hint (``int``, ``float | None``, ``str | int``...).

    A bool is not an int, an int is a float (YAML writes ``1`` for ``1.0``), hints it cannot read pass.

    Example:
        >>> matches_type(3, float | None), matches_type(True, int), matches_type("abc", int)
        (True, False, False)
    """
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(matches_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    origin = typing.get_origin(hint) or hint
    return isinstance(value, origin) if isinstance(origin, type) else True


def _example(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def check_types(section: Mapping[str, Any], schema: Any, where: str) -> None:
    """Check the values of a settings mapping against a dataclass's field types (or ``{key: (hint, example)}``).

    Keys the schema does not know are left to the caller.

    Args:
        section: The settings, e.g. a config's ``trainer`` mapping.
        schema: A dataclass (its fields' type hints; defaults become the example), or a mapping of
            key to ``(type hint, example value)``.
        where: The section's dotted name, for the message.

    Raises:
        ValueError: A value of the wrong type; the message names key, value, expected type and an example.

    Example:
        >>> check_types({"batch_size": [1]}, DATA_LOADER_SETTINGS, "data_loader")
        Traceback (most recent call last):
        ...
        ValueError: data_loader.batch_size=[1] must be an int or null, got list; set it in the config or override it, e.g. data_loader.batch_size=8.
    """
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema)
        fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(schema)}
    else:
        fields = dict(schema)
    for key, value in section.items():
        if key not in fields:
            continue
        hint, example = fields[key]
        if matches_type(value, hint):
            continue
        fix = "set it in the config or override it" + (
            f", e.g. {where}.{key}={_example(example)}" if example is not None and example is not dataclasses.MISSING
            else "")
        raise ValueError(f"{where}.{key}={value!r} must be {describe_type(hint)}, got {type(value).__name__}; {fix}.")


def _check_data_loader(section: Any, where: str) -> None:
    if section is None:
        return
    if not isinstance(section, Mapping):
        # ValueError for every bad config value, whatever its kind: callers (the CLI) handle one kind of bad input.
        raise ValueError(f"{where}={section!r} must be a mapping of settings, got {type(section).__name__}; write it "  # noqa: TRY004
                         f"as '{where}: {{batch_size: 8, num_workers: 4}}' or override single keys ({where}.batch_size=8).")


    allowed = sorted(set(inspect.signature(DataLoader).parameters) - set(_ENGINE_LOADER_ARGUMENTS))
    for key in section:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            reason = "the engine sets it itself" if key in _ENGINE_LOADER_ARGUMENTS else f"DataLoader takes {allowed}"
            raise ValueError(f"{where} has no setting {key!r}{hint}; {reason}. Remove it or fix its name.")
    check_types(section, DATA_LOADER_SETTINGS, where)


# The ``freeze_base`` and ``freeze`` sections: the functions' keywords, their types and an example value for the fix.
FREEZE_BASE_SETTINGS: dict[str, tuple[Any, Any]] = {"train": (str | list, ["fc"]), "freeze_norm_stats": (bool, True)}
FREEZE_SETTINGS: dict[str, tuple[Any, Any]] = {"modules": (str | list, ["conv_stem", "blocks.0"]),
                                               "freeze_norm_stats": (bool, True)}


def check_freeze_base(section: Any, where: str = "freeze_base") -> dict[str, Any] | None:
    """Check a config's ``freeze_base`` section and return the keywords for :func:`convmoe.freeze_base`.

    ``freeze_base: {train: [fc], freeze_norm_stats: false}`` trains only the MoE experts and routers
    and the ``train`` modules (names, globs or ``"re:"`` regexes); ``freeze_base: {}`` only the MoE
    parts; null or absent freezes nothing.

    Args:
        section: The section's value.
        where: Its name, for messages.

    Returns:
        The keywords (``train`` as a list), or None when the section is null.

    Raises:
        ValueError: Not a mapping, an unknown key, or a value of the wrong type.

    Example:
        >>> check_freeze_base({"train": "fc"})
        {'train': ['fc']}
        >>> check_freeze_base({"train": ["fc"], "freeze_norm_stat": True})
        Traceback (most recent call last):
        ...
        ValueError: freeze_base has no setting 'freeze_norm_stat' (did you mean 'freeze_norm_stats'?); it takes freeze_norm_stats, train. Remove it or fix its name.
    """
    return _check_module_list_section(section, where, FREEZE_BASE_SETTINGS, "train", required=False)


def check_freeze(section: Any, where: str = "freeze") -> dict[str, Any] | None:
    """Check a config's ``freeze`` section and return the keywords for :func:`convmoe.freeze_modules`.

    ``freeze: {modules: [conv_stem, bn1, blocks.0], freeze_norm_stats: true}`` freezes the named modules
    (names, globs or ``"re:"`` regexes) of any model, dense or MoE, so that a model and its dense twin
    get the same treatment; null or absent freezes nothing.

    Args:
        section: The section's value.
        where: Its name, for messages.

    Returns:
        The keywords (``modules`` as a list), or None when the section is null.

    Raises:
        ValueError: Not a mapping, no ``modules``, an unknown key, or a value of the wrong type.

    Example:
        >>> check_freeze({"modules": "conv_stem", "freeze_norm_stats": True})
        {'modules': ['conv_stem'], 'freeze_norm_stats': True}
        >>> check_freeze({"freeze_norm_stats": True})
        Traceback (most recent call last):
        ...
        ValueError: freeze has no modules; name the modules to freeze, e.g. freeze.modules=[conv_stem, blocks.0].
    """
    return _check_module_list_section(section, where, FREEZE_SETTINGS, "modules", required=True)


def _check_module_list_section(section: Any, where: str, settings: dict[str, tuple[Any, Any]], list_key: str,
                               required: bool) -> dict[str, Any] | None:
    """A ``{<list_key>: module specs, freeze_norm_stats: bool}`` section checked, with the specs as a list."""
    if section is None:
        return None
    example = f"[{', '.join(settings[list_key][1])}]"
    _check_settings_keys(section, where, settings, f"{{{list_key}: {example}, freeze_norm_stats: false}}")
    if required and not section.get(list_key):
        raise ValueError(f"{where} has no {list_key}; name the modules to freeze, e.g. {where}.{list_key}={example}.")
    names = section.get(list_key, [])
    _check_module_specs(names, f"{where}.{list_key}", example)
    check_types(section, settings, where)
    return {**section, list_key: [names] if isinstance(names, str) else list(names)}


def _check_settings_keys(section: Any, where: str, settings: Mapping[str, Any], example: str) -> None:
    """Raise unless ``section`` is a mapping whose keys are all in ``settings``."""
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}={section!r} must be a mapping of settings, got {type(section).__name__}; write it "  # noqa: TRY004 (as above)
                         f"as '{where}: {example}'.")
    allowed = sorted(settings)
    for key in section:
        if key not in settings:
            raise ValueError(f"{where} has no setting {key!r}{did_you_mean(key, allowed)}; it takes "
                             f"{', '.join(allowed)}. Remove it or fix its name.")


def _check_module_specs(names: Any, where: str, example: str) -> None:
    """Raise unless ``names`` is a module spec string or a list of them."""
    if not (isinstance(names, str) or (isinstance(names, list) and all(isinstance(n, str) for n in names))):
        raise ValueError(f"{where}={names!r} must be a string or a list of strings (module names, globs, 're:' "
                         f"regexes or placements), got {type(names).__name__}; e.g. {where}={example}.")


def _check_target_node(node: Any, where: str, example: str, also: str = "") -> None:
    if not isinstance(node, Mapping):
        raise ValueError(f"{where}={node!r} must be a mapping with a _target_{also}, got {type(node).__name__}; write "  # noqa: TRY004 (as above)
                         f"'{where}: {{_target_: {example}, ...}}'.")
    if TARGET_KEY not in node:
        raise ValueError(f"{where} has no _target_ (keys: {sorted(node)}); add the dotted import path of what builds "
                         f"it, e.g. '_target_: {example}'.")


def _check_dataset(node: Any, where: str) -> None:
    also = " (or a list of them)"
    nodes = node if isinstance(node, list) else [node]
    if isinstance(node, list) and not node:
        raise ValueError(f"{where} is an empty list; give one dataset node with a _target_, or a list of them.")
    for index, item in enumerate(nodes):
        item_where = f"{where}.{index}" if isinstance(node, list) else where
        _check_target_node(item, item_where, "convmoe.data.CIFAR10Dataset", also)
        _check_data_loader(item.get("data_loader"), f"{item_where}.data_loader")


def _check_scheduler(entry: Any, where: str) -> None:
    example = "torch.optim.lr_scheduler.CosineAnnealingLR"
    also = " (or {scheduler: {_target_: ...}, interval: step})"
    if isinstance(entry, Mapping) and "scheduler" in entry:
        _check_target_node(entry["scheduler"], f"{where}.scheduler", example)
        check_types(entry, {"interval": (str, "step"), "frequency": (int, 1), "monitor": (str | None, "val/loss")},
                    where)
    else:
        _check_target_node(entry, where, example, also)


def check_training_config(config: Mapping[str, Any], settings: Any = None, required: Sequence[str] = ()) -> None:
    """Check the shape of a training config before anything is built; raise on the first problem.

    Checks, where present (a null section counts as absent): ``model``, ``loss``, ``optimizer`` and
    ``init_encoder_from`` are ``_target_`` mappings; ``scheduler`` / ``scheduler_list`` entries too;
    every ``<split>_dataset`` is a ``_target_`` mapping or a list of them; ``trainer`` / ``pl_trainer`` /
    ``data_loader`` (top-level and per dataset) are mappings; ``data_loader`` names DataLoader
    settings of the right types; ``freeze_base``, ``freeze``, ``patch`` and ``init_from`` (:func:`check_freeze_base`,
    :func:`check_freeze`, :func:`check_patch`, :func:`check_init_from`); with ``settings``, the ``trainer`` values have its fields' types.

    Args:
        config: A loaded config (:func:`load_config`).
        settings: A dataclass whose fields type the ``trainer`` section (the engine's ``TrainerSettings``).
        required: Sections that must be present and not null (training needs model, loss, optimizer,
            train_dataset).

    Raises:
        ValueError: The first problem, naming the key, what it must be, and the fix.

    Example:
        >>> check_training_config({"model": {"_target_": "torch.nn.Identity"}, "data_loader": {"batch_size": 4}})
        >>> check_training_config({"model": 3})
        Traceback (most recent call last):
        ...
        ValueError: model=3 must be a mapping with a _target_, got int; write 'model: {_target_: convmoe.models.create_classifier, ...}'.
    """
    missing = [key for key in required if config.get(key) is None]
    if missing:
        raise ValueError(f"the config has no {missing[0]!r} section (or it is null); a training config needs "
                         f"{', '.join(required)}.")
    for key, example in _TARGET_SECTIONS.items():
        if config.get(key) is not None:
            _check_target_node(config[key], key, example)
    for key in _SETTINGS_SECTIONS:
        section = config.get(key)
        if key == "data_loader":
            _check_data_loader(section, key)
        elif section is not None and not isinstance(section, Mapping):
            raise ValueError(f"{key}={section!r} must be a mapping of settings, got {type(section).__name__}; write "
                             f"it as '{key}: {{max_epochs: 10}}' or override single keys ({key}.max_epochs=10).")
        elif section is not None and settings is not None:
            check_types(section, settings, key)
    for key in config:
        if str(key).endswith("_dataset") and config[key] is not None:
            _check_dataset(config[key], key)
    check_freeze_base(config.get("freeze_base"))
    check_freeze(config.get("freeze"))
    check_patch(config.get("patch"))
    check_init_from(config.get("init_from"))
    if config.get("scheduler") is not None:
        _check_scheduler(config["scheduler"], "scheduler")
    schedulers = config.get("scheduler_list")
    if schedulers is not None:
        if not isinstance(schedulers, list):
            raise ValueError(f"scheduler_list={schedulers!r} must be a list of scheduler entries, got "
                             f"{type(schedulers).__name__}; write '- scheduler: {{_target_: ...}}' items.")
        for index, entry in enumerate(schedulers):
            _check_scheduler(entry, f"scheduler_list.{index}")


# The ``patch`` section: the keywords of :func:`convmoe.patch` a recipe may give, their types and an example.
PATCH_SETTINGS: dict[str, tuple[Any, Any]] = {
    "targets": (str | list, "last_stage"), "exclude": (str | list | None, ["layer4.0.downsample"]),
    "config": (Mapping | str | None, {"num_experts": 8, "top_k": 2}), "upcycle": (bool, True)}


def check_patch(section: Any, where: str = "patch") -> dict[str, Any] | None:
    """Check a config's ``patch`` section and return the keywords for :func:`convmoe.patch`.

    ``patch: {targets: last_stage, config: {num_experts: 8, top_k: 2}, upcycle: true}`` patches the
    model after its weights are loaded (``init_encoder_from``); ``targets`` and ``exclude`` are names,
    globs, ``"re:"`` regexes or placements, ``config`` the fields of :class:`~convmoe.MoEConfig` or a
    preset name. Null or absent patches nothing.

    Raises:
        ValueError: Not a mapping, no ``targets``, an unknown key, a value of the wrong type, or a
            ``config`` that is not a valid MoEConfig.

    Example:
        >>> check_patch({"targets": "last_stage", "config": {"num_experts": 4}})
        {'targets': 'last_stage', 'config': {'num_experts': 4}}
        >>> check_patch({"target": "last_stage"})
        Traceback (most recent call last):
        ...
        ValueError: patch has no setting 'target' (did you mean 'targets'?); it takes config, exclude, targets, upcycle. Remove it or fix its name.
    """
    if section is None:
        return None
    _check_settings_keys(section, where, PATCH_SETTINGS, "{targets: last_stage, config: {num_experts: 8, top_k: 2}}")
    if section.get("targets") in (None, "", []):
        raise ValueError(f"{where} has no targets; name the convs to patch, e.g. {where}.targets=last_stage (names, "
                         "globs, 're:' regexes or placements).")
    for key in ("targets", "exclude"):
        if section.get(key) is not None:
            _check_module_specs(section[key], f"{where}.{key}", "last_stage")
    check_types(section, PATCH_SETTINGS, where)
    try:
        MoEConfig.coerce(section.get("config"), where=f"{where}.config")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}.config: {error}") from None
    return dict(section)


def check_init_from(value: Any, where: str = "init_from") -> str | None:
    """Check ``init_from``: the trained weights a run starts from, a ``convmoe train`` checkpoint file, a
    ``save_pretrained`` folder or a Hub id (text). Null or absent: the model's own initialisation.

    Example:
        >>> check_init_from(["best.pt"])
        Traceback (most recent call last):
        ...
        ValueError: init_from=['best.pt'] must be a checkpoint file, a save_pretrained folder or a Hub id (text), got list; e.g. init_from=runs/dense/checkpoints/best.pt.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}={value!r} must be a checkpoint file, a save_pretrained folder or a Hub id (text), got "
                         f"{type(value).__name__}; e.g. {where}=runs/dense/checkpoints/best.pt.")
    return value
