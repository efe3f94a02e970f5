"""Guessing the recipe of a model that was not built with :func:`convmoe.create_model`.

A model built by ``timm.create_model`` or a torchvision builder does not remember its keywords, so
``save_pretrained`` proposes candidates, most specific evidence last, and keeps the first whose
rebuild has the same structure (:mod:`convmoe.recipe_check`), then proves it with a probe forward.
smp models record their constructor keywords themselves, so their recipe is exact.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Mapping
from itertools import product
from typing import Any

from torch import nn

from convmoe.factory import RECIPE_ERROR_ATTRIBUTE, BaseRecipe, get_recipe, library_recipe


def infer_recipe(model: nn.Module) -> BaseRecipe | None:
    """The most likely recipe of ``model``, or None when none can be proposed.

    The first of :func:`recipe_candidates`; ``save_pretrained`` checks candidates against the model
    and keeps the first that rebuilds it.

    Example:
        >>> import timm
        >>> infer_recipe(timm.create_model("test_resnet", num_classes=7)).to_dict()
        {'library': 'timm', 'name': 'test_resnet', 'kwargs': {'num_classes': 7}}
        >>> infer_recipe(nn.Conv2d(3, 3, 1)) is None
        True
    """
    candidates = recipe_candidates(model)
    return candidates[0] if candidates else None


def recipe_candidates(model: nn.Module) -> list[BaseRecipe]:
    """Recipes that may rebuild ``model``, to be checked in order.

    The recorded recipe (``create_model``, ``from_pretrained``) alone when there is one; an smp
    model's init config; for timm, the ``pretrained_cfg`` architecture with its class count, input
    channels, and the pooling, activation and output stride read from the modules; for torchvision,
    the builders of the model's class with its class count (and ``aux_loss`` for segmentation).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=7, global_pool="max")
        >>> candidates = [c.kwargs for c in recipe_candidates(model)]
        >>> candidates[0], {"num_classes": 7, "global_pool": "max"} in candidates
        ({'num_classes': 7}, True)
    """
    recorded = get_recipe(model)
    if recorded is not None:
        return [recorded]
    if getattr(model, RECIPE_ERROR_ATTRIBUTE, None):  # create_model got arguments a guess would silently drop
        return []
    smp = _smp_recipe(model)
    if smp is not None:
        return [smp]
    return _timm_candidates(model) or _torchvision_candidates(model)


def library_of(model: nn.Module) -> str | None:
    """``"timm"``, ``"smp"`` or ``"torchvision"`` when ``model``'s class comes from that library.

    Example:
        >>> library_of(nn.Conv2d(1, 1, 1)) is None
        True
    """
    module = type(model).__module__
    for prefix, library in (("timm.", "timm"), ("segmentation_models_pytorch.", "smp"),
                            ("torchvision.models.", "torchvision")):
        if module.startswith(prefix):
            return library
    return None


# -- smp -------------------------------------------------------------------------------------------------


def _smp_recipe(model: nn.Module) -> BaseRecipe | None:
    if library_of(model) != "smp":
        return None
    config = getattr(model, "_hub_mixin_config", None)
    if not isinstance(config, Mapping):
        return None
    try:
        return library_recipe(type(model), config)  # None for an smp class that is not an architecture of its own
    except ValueError:
        return None


# -- timm ------------------------------------------------------------------------------------------------


def _timm_candidates(model: nn.Module) -> list[BaseRecipe]:
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not isinstance(pretrained_cfg, Mapping) or not pretrained_cfg.get("architecture"):
        return []
    import timm

    name = pretrained_cfg["architecture"]
    if not timm.is_model(name):
        return []
    fixed: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        fixed["num_classes"] = model.num_classes
    drop_rate = getattr(model, "drop_rate", None)
    # The classifier's dropout is invisible to the structure check; timm keeps its rate on the model.
    with_drop_rate = [{"drop_rate": float(drop_rate)}] if isinstance(drop_rate, float) and drop_rate > 0 else []
    options = [
        [{}, *({"in_chans": c} for c in _in_chans_guesses(model))],
        [{}, *({"global_pool": p} for p in [_global_pool(model)] if p is not None)],
        [{}, *({"act_layer": a} for a in [_activation_name(model)] if a is not None)],
        [{}, *({"output_stride": s} for s in [_output_stride(model)] if s is not None)],
    ]
    candidates = []
    for extra in [*with_drop_rate, {}]:
        group = []
        for choice in product(*options):
            kwargs = {**fixed, **extra}
            for part in choice:
                kwargs.update(part)
            group.append(BaseRecipe("timm", name, kwargs))
        candidates += sorted(group, key=lambda recipe: len(recipe.kwargs))  # the fewest guessed keywords first
    return candidates


def _in_chans_guesses(model: nn.Module) -> list[int]:
    # The first conv's channels are the input channels, except behind a space-to-depth stem
    # (tresnet: 3 channels arrive as 48), so a few divisions are tried too.
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        return []
    channels = first_conv.in_channels
    guesses = [channels, channels // 16, channels // 4]
    return [c for i, c in enumerate(guesses) if c > 0 and c != 3 and c not in guesses[:i]]


def _global_pool(model: nn.Module) -> str | None:
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):  # ViT-style models keep the pooling name on the model
        return pool
    # CNNs pool in a SelectAdaptivePool2d, on the model or inside its head (ConvNeXt's head.global_pool).
    pool_types = [m.pool_type for m in model.modules() if isinstance(getattr(m, "pool_type", None), str)]
    return pool_types[-1] if pool_types else None


def _activation_name(model: nn.Module) -> str | None:
    from timm.layers.create_act import _ACT_LAYER_DEFAULT  # timm's own name -> class table

    names = {cls: name for name, cls in reversed(list(_ACT_LAYER_DEFAULT.items()))}
    counts = Counter(type(m) for m in model.modules() if type(m) in names and type(m) is not nn.Identity)
    if not counts:
        return None
    return names[counts.most_common(1)[0][0]]


def _output_stride(model: nn.Module) -> int | None:
    dilation = max((max(m.dilation) for m in model.modules() if isinstance(m, nn.Conv2d)), default=1)
    return {1: None, 2: 16, 4: 8}.get(dilation, 8)


# -- torchvision -----------------------------------------------------------------------------------------


def _torchvision_candidates(model: nn.Module) -> list[BaseRecipe]:
    if library_of(model) != "torchvision":
        return []
    import torchvision

    module = type(model).__module__
    kwargs: dict[str, Any] = {}
    classifier = getattr(model, "classifier", None)
    if ".segmentation." in module and classifier is not None:
        last_conv = [m for m in classifier.modules() if isinstance(m, nn.Conv2d)]
        if last_conv:
            kwargs["num_classes"] = last_conv[-1].out_channels
        kwargs["aux_loss"] = getattr(model, "aux_classifier", None) is not None
    else:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:
            kwargs["num_classes"] = linears[-1].out_features
    candidates = []
    for name in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(name)
        if builder.__module__ != module:
            continue
        parameters = inspect.signature(builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        accepted = {k: v for k, v in kwargs.items() if takes_any or k in parameters}
        candidates.append(BaseRecipe("torchvision", name, accepted))
    return candidates
