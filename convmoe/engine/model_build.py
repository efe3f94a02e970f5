"""A recipe's model as the engine builds it: the ``model`` section, the weights of ``init_from`` (a trained model)
or ``init_encoder_from`` (an encoder), then the ``patch`` section (:func:`convmoe.patch`), so that patched experts
start as copies of the loaded convs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

import convmoe
from convmoe.engine.config import TARGET_KEY, instantiate, locate
from convmoe.engine.config_check import check_init_from, check_patch
from convmoe.engine.saved_models import checkpoint_weights, is_checkpoint_file, load_saved_model
from convmoe.hub import check_state_matches
from convmoe.weight_sources import without_weight_sources


def without_pretrained_download(node: Mapping[str, Any]) -> dict[str, Any]:
    """The model node with every weight source switched off (a checkpoint brings every weight): its target's
    ``pretrained`` / ``encoder_weights`` / ``weights`` off, even where the node leaves them to a default, and
    ``checkpoint_path`` dropped (:func:`convmoe.weight_sources.without_weight_sources`).

    Example:
        >>> without_pretrained_download({"_target_": "timm.create_model", "encoder_weights": "imagenet"})
        {'_target_': 'timm.create_model', 'encoder_weights': None, 'pretrained': False}
    """
    target = node.get(TARGET_KEY)
    return without_weight_sources(node, locate(target) if isinstance(target, str) else None)


def build_model(config: Mapping[str, Any], pretrained: bool = True) -> nn.Module:
    """Build ``config["model"]``, load ``init_from`` or ``init_encoder_from`` into it, then apply ``patch``.

    Args:
        config: A loaded config with a ``model`` section (a ``_target_`` mapping).
        pretrained: True: the start of training (every weight of ``init_from``, else the model's own
            pretrained weights and ``init_encoder_from``; the patch upcycles those weights unless
            ``patch.upcycle`` is false). False: the architecture only, for weights that come from a
            checkpoint (no download, fresh experts).

    Raises:
        ValueError: A bad ``patch`` or ``init_from`` section (checked before anything is built), a target
            that matches no module, or ``init_from`` weights that do not fit the model section.

    Example:
        >>> model = build_model({"model": {"_target_": "timm.create_model", "model_name": "test_resnet"},
        ...                      "patch": {"targets": "last_stage", "config": {"num_experts": 2}}}, pretrained=False)
        >>> [name for name, _ in convmoe.moe_blocks(model)]
        ['layer4.0.conv1', 'layer4.0.conv2']
    """
    patch = check_patch(config.get("patch"))
    init_from = check_init_from(config.get("init_from")) if pretrained else None
    downloads = pretrained and init_from is None  # init_from brings every weight
    model = instantiate(config["model"] if downloads else without_pretrained_download(config["model"]))
    if init_from is not None:
        load_initial_weights(model, init_from)
    elif pretrained and config.get("init_encoder_from") is not None:
        from convmoe.models import load_encoder_weights  # convmoe.models imports smp, an optional extra

        load_encoder_weights(model, instantiate(config["init_encoder_from"]))
    if patch is not None and isinstance(model, nn.Module):
        convmoe.patch(model, **({**patch, "upcycle": False} if not pretrained else patch))
    return model


def load_initial_weights(model: nn.Module, source: str) -> None:
    """Copy every weight of ``source`` (a ``convmoe train`` checkpoint, a ``save_pretrained`` folder or a Hub
    id) into ``model``, the recipe's model section as built before its ``patch`` section.

    With a ``patch`` section this is sparse upcycling from a trained model: a dense run's checkpoint
    goes in here, and the patched convs' experts start as copies of its trained convs.

    Raises:
        FileNotFoundError: No such checkpoint, folder or Hub repo (the message starts with ``init_from``).
        ValueError: Weights that do not fit the model (missing, unexpected or differently shaped
            tensors), or an unreadable source.
    """
    try:
        weights = checkpoint_weights(source) if is_checkpoint_file(source) else load_saved_model(source).state_dict()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"init_from: {error}") from None
    check_state_matches(model, weights, strict=True, where=f"init_from={source}",
                        fix="init_from must hold the weights of this recipe's model section as built before its "
                            "patch section (e.g. the checkpoint of a run of the dense recipe); point it at such a run")
    model.load_state_dict(weights)
