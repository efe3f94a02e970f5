"""The words of a card that come from the model and its recipe: the MoE blocks, the initialisation,
the preprocessing and the method references. Read from the objects, never typed in a card.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from convmoe.diagnostics import moe_blocks
from convmoe.dropout import create_dropout
from convmoe.engine.config_check import check_freeze, check_freeze_base, check_patch
from convmoe.routers.base import DEFAULT_CAPACITY_FACTOR

_REFERENCES = {
    "noisy_top_k": "Noisy top-k gating: Shazeer et al., 2017, arXiv:1701.06538.",
    "switch": "Switch load-balancing loss: Fedus et al., 2021, arXiv:2101.03961.",
    "expert_choice": "Expert-choice routing: Zhou et al., 2022, arXiv:2202.09368.",
    "bias_balancing": "Auxiliary-loss-free load balancing: Wang et al., 2024, arXiv:2408.15664.",
    "upernet": "UPerNet: Xiao et al., 2018, arXiv:1807.10221.",
    "efficientnet": "EfficientNet (Lite0 is its mobile variant): Tan and Le, 2019, arXiv:1905.11946.",
}


def _block_summary(block: nn.Module) -> str:
    config = block.config
    router = config.router if isinstance(config.router, str) else type(block.router).__name__
    tokens = config.tokens if isinstance(config.tokens, str) else str(block.tokens)
    kind = config.experts if isinstance(config.experts, str) else type(block.experts).__name__
    rank = getattr(block.experts, "rank", None)
    kind_text = {"conv": "", "lowrank": "low-rank "}.get(kind, f"{kind} ") + (f"(rank {rank}) " if rank else "")
    text = f"{config.num_experts} {kind_text}experts, top-{config.top_k}, {tokens} tokens, {router} routing"
    if router == "expert_choice":
        text += f" (capacity factor {config.capacity_factor if config.capacity_factor is not None else DEFAULT_CAPACITY_FACTOR})"
    if config.noise_std:
        text += f", router noise {config.noise_std:g}"
    if config.bias_balancing:
        text += f", loss-free bias balancing (rate {config.bias_balancing:g})"
    if config.shared_expert:
        text += ", a shared expert"
    if config.dropout:
        rate = config.drop_rate if config.drop_rate is not None else create_dropout(config.dropout).drop_rate
        text += f", {config.dropout} expert dropout {rate:g} in training"
    return text


def _names(names: list[str]) -> str:
    if len(names) <= 2:
        return ", ".join(f"`{name}`" for name in names)
    return f"{len(names)} convs (`{names[0]}` ... `{names[-1]}`)"


def describe_moe(model: nn.Module) -> tuple[str, list[str]]:
    """The MoE blocks of ``model`` in words (grouped by identical settings), and their names.

    Example:
        >>> from convmoe import MoEConv2d
        >>> describe_moe(nn.Sequential(MoEConv2d(4, 4, 3, num_experts=4, top_k=1)))
        ('`0`: 4 experts, top-1, pixel tokens, token_choice routing', ['0'])
        >>> describe_moe(nn.Conv2d(1, 1, 1))
        ('none (dense model)', [])
    """
    blocks = dict(moe_blocks(model))
    if not blocks:
        return "none (dense model)", []
    groups: dict[str, list[str]] = {}
    for name, block in blocks.items():
        groups.setdefault(_block_summary(block), []).append(name)
    return "; ".join(f"{_names(names)}: {summary}" for summary, names in groups.items()), list(blocks)


def describe_initialization(config: Mapping[str, Any], first_phase: bool = False) -> str:
    """Where training started, from a training config (an encoder loader, pretrained weights, or random), and
    what it kept frozen. ``first_phase``: ``init_from`` is the checkpoint of a run the train commands make first.

    Example:
        >>> describe_initialization({"model": {"_target_": "x.Net"}, "init_encoder_from": {"_target_": "a.load"}})
        'encoder weights from `a.load`'
        >>> describe_initialization({"model": {"_target_": "convmoe.models.create_classifier",
        ...                                    "model_name": "efficientnet_lite0", "pretrained": True,
        ...                                    "moe_targets": "last_stage"}})
        'ImageNet weights from `convmoe.pretrained.load_efficientnet_lite0`; every expert starts as a copy of the conv it replaces (upcycling)'
        >>> describe_initialization({"model": {}, "freeze": {"modules": ["conv_stem", "bn1"], "freeze_norm_stats": True}})
        'random (trained from scratch); `conv_stem`, `bn1` frozen (weights and norm statistics)'
        >>> describe_initialization({"model": {}, "init_from": "runs/dense/checkpoints/best.pt"}, first_phase=True)
        'every weight from `runs/dense/checkpoints/best.pt`, the first phase (the first command of each train line)'
    """
    return _starting_weights(config, first_phase) + _patched(config) + _frozen(config)


def _patched(config: Mapping[str, Any]) -> str:
    """The recipe's ``patch`` section's starting weights in words (empty without one)."""
    patch = check_patch(config.get("patch"))
    if patch is None:
        return ""
    if patch.get("upcycle", True):
        return "; the patched convs' experts start as copies of those convs (upcycling)"
    return "; the patched convs' experts start random"


def _frozen(config: Mapping[str, Any]) -> str:
    """The recipe's ``freeze`` and ``freeze_base`` sections in words (empty when it trains everything)."""
    parts = []
    if freeze := check_freeze(config.get("freeze")):
        stats = " (weights and norm statistics)" if freeze.get("freeze_norm_stats") else ""
        parts.append(", ".join(f"`{name}`" for name in freeze["modules"]) + f" frozen{stats}")
    if (base := check_freeze_base(config.get("freeze_base"))) is not None:
        kept = "".join(f", `{name}`" for name in base.get("train", []))
        parts.append(f"all but the MoE experts, routers{kept} frozen")
    return "".join(f"; {part}" for part in parts)


def _starting_weights(config: Mapping[str, Any], first_phase: bool) -> str:
    from convmoe.models.classification import (
        PACKAGED_WEIGHTS,  # convmoe.models imports smp, an optional extra
    )

    model = config.get("model") or {}
    if config.get("init_from") and first_phase:
        return f"every weight from `{config['init_from']}`, the first phase (the first command of each train line)"
    if config.get("init_from"):
        return f"every weight from the trained model `{config['init_from']}`"
    if config.get("init_encoder_from"):
        return f"encoder weights from `{config['init_encoder_from'].get('_target_', '?')}`"
    if model.get("pretrained"):
        name = model.get("model_name", "?")
        source = (f"ImageNet weights from `convmoe.pretrained.{PACKAGED_WEIGHTS[name]}`" if name in PACKAGED_WEIGHTS
                  else f"timm's pretrained weights of `{name}`")
        if model.get("moe_targets"):
            source += "; every expert starts as a copy of the conv it replaces (upcycling)"
        return source
    if model.get("encoder_weights"):
        return f"smp encoder weights `{model['encoder_weights']}`"
    return "random (trained from scratch)"


def describe_preprocessing(config: Mapping[str, Any]) -> list[str]:
    """The transforms of a config's ``val_dataset``, as ``Name(arg=value, ...)`` strings.

    Example:
        >>> describe_preprocessing({"val_dataset": {"augmentation_list": [
        ...     {"_target_": "convmoe.data.transforms.Resize", "height": 128, "width": 128}]}})
        ['Resize(height=128, width=128)']
    """
    node = config.get("val_dataset") or {}
    steps = []
    for step in node.get("augmentation_list") or []:
        if not isinstance(step, Mapping):
            continue
        name = str(step.get("_target_", "?")).rsplit(".", 1)[-1]
        arguments = ", ".join(f"{key}={value}" for key, value in step.items() if not key.startswith("_"))
        steps.append(f"{name}({arguments})")
    return steps


def method_references(model: nn.Module, config: Mapping[str, Any]) -> list[str]:
    """Papers of the methods a model uses (routing, balancing loss, architecture), from its blocks and recipe.

    Example:
        >>> from convmoe import MoEConv2d
        >>> method_references(nn.Sequential(MoEConv2d(4, 4, 1, noise_std=1.0)), {"model": {}})
        ['Noisy top-k gating: Shazeer et al., 2017, arXiv:1701.06538.', 'Switch load-balancing loss: Fedus et al., 2021, arXiv:2101.03961.']
    """
    keys = []
    for _, block in moe_blocks(model):
        block_config = block.config
        if block_config.router == "token_choice" and block_config.noise_std:
            keys.append("noisy_top_k")
        if block_config.router == "expert_choice":
            keys.append("expert_choice")
        if "switch" in (block_config.losses or {}):
            keys.append("switch")
        if block_config.bias_balancing:
            keys.append("bias_balancing")
    names = " ".join(str(v) for v in (config.get("model") or {}).values()).lower()
    names += " " + type(model).__name__.lower()
    if "upernet" in names:
        keys.append("upernet")
    if "efficientnet" in names:
        keys.append("efficientnet")
    return [_REFERENCES[key] for key in dict.fromkeys(keys)]
