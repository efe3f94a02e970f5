"""Where a model builder can fetch weights or files: switched off when a saved recipe is rebuilt.

A checkpoint brings every weight, so rebuilding its model must read nothing else and download nothing:
timm's ``pretrained`` and ``checkpoint_path``, smp's ``encoder_weights``, torchvision's ``weights`` and
``weights_backbone``. A keyword from a downloaded file could otherwise make a trusted builder read a
local file or reach the Hub. Model names that live on the Hub (``hf-hub:``) cannot be rebuilt offline at all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

# Keyword -> the value that loads nothing.
WEIGHT_SWITCHES: dict[str, Any] = {"pretrained": False, "encoder_weights": None, "weights": None,
                                   "weights_backbone": None}
# Keywords that name a weight file or a config overlay (timm, and smp's "tu-" encoders through timm).
FILE_KEYWORDS = ("checkpoint_path", "pretrained_cfg_overlay")
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "tu-hf-hub:", "tu-hf_hub:")
# Keywords that name the model or encoder to build.
NAME_KEYWORDS = ("model_name", "encoder_name", "name")


def without_weight_sources(kwargs: Mapping[str, Any], builder: Callable[..., Any] | None = None) -> dict[str, Any]:
    """``kwargs`` with every weight source switched off: the switches set to load nothing, file keywords dropped.

    A switch the builder declares is set even where ``kwargs`` leaves it out (smp's ``encoder_weights``
    defaults to ``"imagenet"``).

    Args:
        kwargs: The builder's keyword arguments.
        builder: The function or class they are for; None: only the keywords present are switched.

    Example:
        >>> without_weight_sources({"encoder_weights": "imagenet", "checkpoint_path": "/x.pth", "classes": 2})
        {'encoder_weights': None, 'classes': 2}
        >>> def build(pretrained: bool = True): ...
        >>> without_weight_sources({}, build)
        {'pretrained': False}
    """
    result = {key: value for key, value in kwargs.items() if key not in FILE_KEYWORDS}
    declared = _parameters(builder)
    for key, off in WEIGHT_SWITCHES.items():
        if key in result or key in declared:
            result[key] = off
    return result


def hub_model_names(kwargs: Mapping[str, Any], name: str | None = None) -> list[str]:
    """The model or encoder names among ``name`` and ``kwargs`` that are fetched from the Hub (``hf-hub:...``).

    Example:
        >>> hub_model_names({"encoder_name": "tu-hf-hub:org/net", "classes": 2})
        ['tu-hf-hub:org/net']
        >>> hub_model_names({}, "resnet18")
        []
    """
    names = [name, *(kwargs.get(key) for key in NAME_KEYWORDS)]
    return [value for value in names if isinstance(value, str) and value.lower().startswith(HUB_PREFIXES)]


def _parameters(builder: Callable[..., Any] | None) -> set[str]:
    if builder is None:
        return set()
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin without a signature: only the keywords present
        return set()
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, parameter in parameters.items() if parameter.kind in keyword_kinds}
