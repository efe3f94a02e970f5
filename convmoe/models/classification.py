"""Image classifiers for training with the engine: a timm model, optionally patched with MoE blocks."""

from __future__ import annotations

import importlib
from typing import Any

import timm
from torch import nn

from convmoe.config import MoEConfig
from convmoe.trust import register_factory

# Models whose ImageNet weights ship inside a pip package, loaded by convmoe.pretrained (no download).
PACKAGED_WEIGHTS = {"efficientnet_lite0": "load_efficientnet_lite0"}


def resolve_moe_config(moe_config: MoEConfig | dict[str, Any] | str | None) -> MoEConfig:
    """:meth:`convmoe.MoEConfig.coerce` under the name the engine's configs have used.

    Example:
        >>> resolve_moe_config({"preset": "shared_expert_moe", "num_experts": 4}).num_experts
        4
        >>> resolve_moe_config("upernet_fusion_moe").top_k
        2
    """
    return MoEConfig.coerce(moe_config, where="moe_config")


def _packaged_model(model_name: str) -> nn.Module:
    try:
        pretrained = importlib.import_module("convmoe.pretrained")
    except ImportError as error:
        raise ImportError(f"pretrained {model_name!r} needs convmoe.pretrained, which is not available: {error}") from error
    return getattr(pretrained, PACKAGED_WEIGHTS[model_name])()


@register_factory  # a model builder a downloaded recipe may name
def create_classifier(model_name: str, num_classes: int, pretrained: bool = False, in_chans: int = 3,
                      moe_targets: str | list[str] | None = None,
                      moe_config: MoEConfig | dict[str, Any] | str | None = None, **kwargs: Any) -> nn.Module:
    """A timm classifier with ``num_classes`` outputs, its convs at ``moe_targets`` made MoE blocks.

    With ``pretrained=True``, models listed in ``PACKAGED_WEIGHTS`` (``efficientnet_lite0``) load
    their ImageNet weights from an installed package (``convmoe.pretrained``), others through timm.
    The classifier is then reset to ``num_classes``. Patching upcycles: every expert starts as a
    copy of the conv it replaces, so the patched model computes what the dense one did.

    Args:
        model_name: A timm model name.
        num_classes: Output classes.
        pretrained: Start from ImageNet weights.
        in_chans: Input channels (timm's keyword; not with packaged weights).
        moe_targets: What :func:`convmoe.patch` replaces (a target preset such as ``"last_stage"``,
            a glob, ``"re:..."``, or a list); None keeps the model dense.
        moe_config: The MoE settings: a ``MoEConfig``, a dict of its fields (optionally with a
            ``"preset"`` name), or a preset name.
        **kwargs: Passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Returns:
        The model, in training mode.

    Raises:
        ValueError: ``in_chans`` other than 3 with packaged pretrained weights.

    Example:
        >>> import torch
        >>> model = create_classifier("test_resnet", num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if pretrained and model_name in PACKAGED_WEIGHTS:
        if in_chans != 3 or kwargs:
            raise ValueError(f"packaged pretrained {model_name!r} takes no in_chans={in_chans} or {sorted(kwargs)}; "
                             "use pretrained=False to build it with other settings.")
        model = _packaged_model(model_name)
        model.reset_classifier(num_classes)
    else:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                  **kwargs)
    if moe_targets is not None:
        import convmoe

        convmoe.patch(model, moe_targets, resolve_moe_config(moe_config))
    return model.train()
