"""Target specs: which convolutions of a model ``convmoe.patch`` replaces.

One syntax, one rule. A spec is

- a string starting with ``"re:"``: a regular expression, matched in full against qualified module
  names (``"re:decoder\\..*"``);
- a placement name (``"last"``, ``"last_stage"``, ``"decoder_last"``, ``"fusion"``; see
  :mod:`convmoe.patch.placements`); a string that matches no module but is close to a placement
  name (``"last-stage"``) is an error that suggests the placement;
- any other string: a glob over qualified names (``"layer4.*.conv2"``; ``*`` also crosses dots) or,
  without wildcards, an exact name;
- a module class (every instance), or a predicate ``(name, module) -> bool``;
- a list or tuple of these (their union; each must match something).

A spec selects convolutions. A module that holds exactly one convolution (conv + norm + act blocks
such as smp's ``Conv2dReLU`` or timm's ``ConvNormAct``) stands for that convolution; other modules
matched by a glob are ignored. Modules inside an MoE block are never matched.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from convmoe.formatting import listing
from convmoe.patch.converters import can_convert
from convmoe.patch.inventory import conv_names, is_conv_like, model_modules
from convmoe.patch.placements import PLACEMENTS

TargetSpec = str | type | Callable[[str, nn.Module], bool] | Sequence["TargetSpec"]

_MAX_LISTED = 5


def describe_spec(spec: Any) -> str:
    """How a spec is named in messages.

    Example:
        >>> describe_spec("layer4.*"), describe_spec(nn.Conv2d)
        ("'layer4.*'", 'Conv2d')
    """
    if isinstance(spec, str):
        return f"'{spec}'"
    if isinstance(spec, type):
        return spec.__name__
    return getattr(spec, "__name__", repr(spec))


def _flatten(spec: Any, what: str) -> list[Any]:
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"patch(): {what} is an empty list; give at least one name, glob, 're:' regex, placement, "
                             "class or predicate.")
        return [item for entry in spec for item in _flatten(entry, what)]
    if isinstance(spec, (str, type)) or callable(spec):
        return [spec]
    raise TypeError(f"patch(): {what} must be a name, glob, 're:' regex, placement, module class, predicate "
                    f"(name, module) -> bool, or a list of these; got {spec!r} ({type(spec).__name__}).")


def _match(spec: Any, model: nn.Module, modules: dict[str, nn.Module], what: str) -> list[str]:
    if isinstance(spec, str) and spec in PLACEMENTS:
        return PLACEMENTS[spec](model)
    if isinstance(spec, str) and spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as error:
            raise ValueError(f"patch(): {what} {spec!r} is not a valid regular expression: {error}.") from None
        return [name for name in modules if name and pattern.fullmatch(name)]
    if isinstance(spec, str):
        return [name for name in modules if name and fnmatch.fnmatchcase(name, spec)]
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise TypeError(f"patch(): {what} class {spec.__name__} is not an nn.Module subclass.")
        return [name for name, module in modules.items() if isinstance(module, spec)]
    return [name for name, module in modules.items() if spec(name, module)]


def _resolve(name: str, modules: dict[str, nn.Module], convs: list[str]) -> list[str]:
    """The convs ``name`` stands for: itself if conv-like, its only conv if it wraps one, else none."""
    if is_conv_like(modules[name]):
        return [name]
    prefix = f"{name}." if name else ""
    inner = [conv for conv in convs if conv.startswith(prefix)]
    outermost = [conv for conv in inner if not any(conv.startswith(f"{other}.") for other in inner)]
    return outermost if len(outermost) == 1 else []


def _closest(query: str, convs: list[str], is_glob: bool) -> list[str]:
    """Conv names a misspelt spec probably meant.

    For a glob or exact name, each literal dot-segment is swapped for the most similar segment the
    convs have at that depth ('layer5.*' -> 'layer4.*', 'layer3.0.conv3' -> 'layer3.0.conv1'/'conv2')
    and the convs the corrected spec matches are proposed; otherwise the most similar names.
    """
    if is_glob:
        segments = query.split(".")
        proposals: dict[str, None] = {}
        for depth, segment in enumerate(segments):
            if any(char in segment for char in "*?["):
                continue
            values = sorted({parts[depth] for parts in (c.split(".") for c in convs) if len(parts) > depth})
            scored = [(difflib.SequenceMatcher(None, segment, v).ratio(), v) for v in values if v != segment]
            scored = [(score, value) for score, value in scored if score >= 0.6]
            best = max((score for score, _ in scored), default=None)
            for _, value in sorted((sv for sv in scored if sv[0] == best), reverse=True):
                pattern = ".".join([*segments[:depth], value, *segments[depth + 1:]])
                proposals.update(dict.fromkeys(c for c in convs if fnmatch.fnmatchcase(c, pattern)))
        if proposals:
            return list(proposals)
    close = difflib.get_close_matches(query, convs, n=_MAX_LISTED, cutoff=0.5)
    return close or difflib.get_close_matches(query, convs, n=_MAX_LISTED, cutoff=0.0)


def listed_names(names: Sequence[str]) -> str:
    """Names for a message: the first five quoted, then how many more.

    Example:
        >>> listed_names(["a", "b"])
        "'a', 'b'"
    """
    shown = ", ".join(repr(name) for name in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _no_conv_message(spec: Any, matched: list[str], modules: dict[str, nn.Module], convs: list[str],
                     what: str) -> str:
    parts = []
    for name in matched[:_MAX_LISTED]:
        module = modules[name]
        inner = [conv for conv in convs if conv.startswith(f"{name}.")] if name else convs
        if inner:
            parts.append(f"{name!r} ({type(module).__name__} holding {len(inner)} convs, e.g. {inner[0]!r}; "
                         f"use {name + '.*'!r} or name them)")
        else:
            parts.append(f"{name!r} ({type(module).__name__})")
    more = f" and {len(matched) - _MAX_LISTED} more" if len(matched) > _MAX_LISTED else ""
    return (f"patch(): {what} {describe_spec(spec)} matched {len(matched)} module(s) but no convolution: "
            f"{', '.join(parts)}{more}.")


def no_match_hint(spec: Any, modules: Mapping[str, nn.Module], names: list[str], kind: str = "convolutions") -> str:
    """What a spec that matched nothing could have meant, among ``names`` (the model's ``kind``): close names
    for a string, their classes for a class; a predicate gets no guess.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 1, 1))
        >>> no_match_hint(nn.ConvTranspose2d, dict(model.named_modules()), ["0"])
        "the model's convolutions are Conv2d"
    """
    if not names:
        return f"the model has no {kind}"
    if isinstance(spec, str):
        is_regex = spec.startswith("re:")
        closest = _closest(spec[3:] if is_regex else spec, names, is_glob=not is_regex)
        return f"closest names: {listed_names(closest)}" if closest else "no name is close"
    if isinstance(spec, type):
        return f"the model's {kind} are {listing(sorted({type(modules[n]).__name__ for n in names}), quote=False)}"
    return "the predicate returned False for every module"


def refusal_details(refused: Mapping[str, str], modules: Mapping[str, nn.Module]) -> str:
    """Refused convs for a message, grouped by class and reason: each reason once, with the names it covers.

    Example:
        >>> convs = {"a": nn.ConvTranspose2d(1, 1, 2), "b": nn.ConvTranspose2d(1, 1, 2)}
        >>> refusal_details({"a": "it transposes", "b": "it transposes"}, convs)
        "'a', 'b' (ConvTranspose2d: it transposes)"
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for name, reason in refused.items():
        groups.setdefault((type(modules[name]).__name__, reason), []).append(name)
    return "; ".join(f"{listed_names(names)} ({kind}: {reason})" for (kind, reason), names in groups.items())


def _closest_placement(spec: str) -> str | None:
    """The placement a string that matched no module probably meant ('last-stage' -> 'last_stage')."""
    if spec.startswith("re:") or any(char in spec for char in "*?[."):
        return None
    normalized = re.sub(r"[\s-]+", "_", spec.strip().lower())
    if normalized in PLACEMENTS:
        return normalized
    close = difflib.get_close_matches(normalized, list(PLACEMENTS), n=1, cutoff=0.75)
    return close[0] if close else None


def _match_all(specs: Any, model: nn.Module, modules: dict[str, nn.Module], convs: list[str],
               what: str) -> list[tuple[Any, list[str]]]:
    """(spec, matched names) for every spec of a targets/exclude argument; each must match a module."""
    results = []
    for spec in _flatten(specs, what):
        matched = _match(spec, model, modules, what)
        placement = _closest_placement(spec) if isinstance(spec, str) and not matched else None
        if placement is not None:
            raise ValueError(f"patch(): {what} {describe_spec(spec)} matched no module; did you mean the placement "
                             f"{placement!r}? Placements: {', '.join(sorted(PLACEMENTS))}.")
        if not matched:
            raise ValueError(f"patch(): {what} {describe_spec(spec)} matched no module; "
                             f"{no_match_hint(spec, modules, convs)}.")
        results.append((spec, matched))
    return results


def _select(specs: Any, model: nn.Module, modules: dict[str, nn.Module], convs: list[str], what: str) -> list[str]:
    """Conv names a targets argument selects, in registration order; every spec must select a conv."""
    selected: dict[str, None] = {}
    for spec, matched in _match_all(specs, model, modules, convs, what):
        resolved = [conv for name in matched for conv in _resolve(name, modules, convs)]
        if not resolved:
            raise ValueError(_no_conv_message(spec, matched, modules, convs, what))
        selected.update(dict.fromkeys(resolved))
    order = {name: i for i, name in enumerate(modules)}
    return sorted(selected, key=order.__getitem__)


def _is_under(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(f"{ancestor}.")


@dataclass(frozen=True)
class Selection:
    """What a targets/exclude pair selects in a model.

    Attributes:
        names: Convs that will be replaced, in registration order.
        refused: Selected convs that cannot be converted, name -> reason.
        excluded: Convs removed by ``exclude``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2))
        >>> select_targets(model, ["0"]).names
        ['0']
    """

    names: list[str]
    refused: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)


def _shared_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def select_targets(model: nn.Module, targets: TargetSpec, exclude: TargetSpec | None = None) -> Selection:
    """Resolve ``targets`` minus ``exclude`` to the convolutions that ``patch`` would replace.

    Selected convs that cannot be converted are dropped with a warning that gives each reason; an
    error is raised when nothing convertible is left.

    Args:
        model: The model to search.
        targets: See the module docstring.
        exclude: Same kinds of spec; a matched module removes itself and every conv inside it
            (``exclude="decoder"`` keeps the whole decoder dense).

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: A spec matches no module, or no convolution; all matched convs are excluded or
            cannot be converted.
        TypeError: A spec is of an unsupported type.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet")
        >>> select_targets(model, "layer4.*.conv2").names
        ['layer4.0.conv2']
        >>> select_targets(model, "re:layer[34]\\\\..*conv1", exclude="layer3.*").names
        ['layer4.0.conv1']
    """
    modules = model_modules(model)
    convs = conv_names(modules)
    names = _select(targets, model, modules, convs, "targets")
    excluded: list[str] = []
    if exclude is not None:
        removed = [name for _, matched in _match_all(exclude, model, modules, convs, "exclude") for name in matched]
        excluded = [name for name in names if any(_is_under(name, ancestor) for ancestor in removed)]
        names = [name for name in names if name not in excluded]
        if not names:
            raise ValueError(f"patch(): exclude {describe_spec(exclude)} removes every conv that targets "
                             f"{describe_spec(targets)} selected ({listed_names(excluded)}); nothing is left to patch.")

    shared = _shared_names(model)
    refused: dict[str, str] = {}
    for name in names:
        aliases = shared.get(id(modules[name]), [name])
        reason = (f"the same module is registered under several names ({listed_names(aliases)}); patching one would "
                  "leave the others dense" if len(aliases) > 1 else can_convert(modules[name]))
        if reason is not None:
            refused[name] = reason
    accepted = [name for name in names if name not in refused]
    if not accepted:
        raise ValueError(f"patch(): targets {describe_spec(targets)} matched only convolutions convmoe cannot "
                         f"convert: {refusal_details(refused, modules)}.")
    # A refused container whose own convs were accepted (timm's MixedConv2d) is covered: no warning.
    noisy = {name: reason for name, reason in refused.items()
             if not any(other.startswith(f"{name}.") for other in accepted)}
    if noisy:
        warnings.warn(f"patch(): skipping {len(noisy)} selected conv(s) that cannot be converted: "
                      f"{refusal_details(noisy, modules)}.",
                      UserWarning, stacklevel=3)
    return Selection(accepted, refused, excluded)
