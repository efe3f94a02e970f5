"""A recipe's model as the engine builds it: the ``model`` section, the weights of ``init_encoder_from``, then the
``patch`` section (:func:`convmoe.patch`), so that patched experts start as copies of the loaded convs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

import convmoe
from convmoe.engine.config import instantiate
from convmoe.engine.config_check import check_patch


def without_pretrained_download(node: Mapping[str, Any]) -> dict[str, Any]:
    """The model node with its own pretrained weights switched off (a checkpoint brings every weight).

    Example:
        >>> without_pretrained_download({"_target_": "x", "encoder_weights": "imagenet"})
        {'_target_': 'x', 'encoder_weights': None}
    """
    node = dict(node)
    if "encoder_weights" in node:
        node["encoder_weights"] = None
    if "pretrained" in node:
        node["pretrained"] = False
    return node


def build_model(config: Mapping[str, Any], pretrained: bool = True) -> nn.Module:
    """Build ``config["model"]``, load ``init_encoder_from`` into its smp encoder, then apply ``patch``.

    Args:
        config: A loaded config with a ``model`` section (a ``_target_`` mapping).
        pretrained: True: the start of training (the model's own pretrained weights, then
            ``init_encoder_from``; the patch upcycles those weights unless ``patch.upcycle`` is false).
            False: the architecture only, for weights that come from a checkpoint (no download, fresh experts).

    Raises:
        ValueError: A bad ``patch`` section (checked before anything is built), or a target that
            matches no module.

    Example:
        >>> model = build_model({"model": {"_target_": "timm.create_model", "model_name": "test_resnet"},
        ...                      "patch": {"targets": "last_stage", "config": {"num_experts": 2}}}, pretrained=False)
        >>> [name for name, _ in convmoe.moe_blocks(model)]
        ['layer4.0.conv1', 'layer4.0.conv2']
    """
    patch = check_patch(config.get("patch"))
    model = instantiate(config["model"] if pretrained else without_pretrained_download(config["model"]))
    if pretrained and config.get("init_encoder_from") is not None:
        from convmoe.models import load_encoder_weights  # convmoe.models imports smp, an optional extra

        load_encoder_weights(model, instantiate(config["init_encoder_from"]))
    if patch is not None and isinstance(model, nn.Module):
        convmoe.patch(model, **({**patch, "upcycle": False} if not pretrained else patch))
    return model
