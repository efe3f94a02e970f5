"""Configurations from the literature, as named MoEConfig presets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from convmoe.config import MoEConfig
from convmoe.routers.base import DEFAULT_CAPACITY_FACTOR


def upernet_fusion_moe(shared_expert: bool = False, **overrides: Any) -> MoEConfig:
    """MoE at UPerNet's fusion block: per-pixel token choice, top-2 of 8, noisy gating.

    Noisy top-k gating with noise std 1.0 follows Shazeer et al. (2017, arXiv:1701.06538); the
    switch load-balancing loss at weight 0.01 follows Fedus et al. (2021, arXiv:2101.03961); the
    decoder is UPerNet (Xiao et al., 2018, arXiv:1807.10221). This is the setting of the
    UPerNetMoE seed configuration (``moe_num_experts=8, moe_top_k=2, moe_noise_std=1.0,
    moe_aux_loss_weight=0.01``).

    Example:
        >>> upernet_fusion_moe().top_k
        2
    """
    base = MoEConfig(num_experts=8, top_k=2, tokens="pixel", router="token_choice", noise_std=1.0,
                     shared_expert=shared_expert, losses={"switch": 0.01})
    return base.replace(**overrides)


def upernet_fusion_moe_expert_choice(**overrides: Any) -> MoEConfig:
    """UPerNet fusion-block MoE with expert-choice routing, capacity factor 1.25 and no aux loss.

    Expert choice (Zhou et al., 2022, arXiv:2202.09368) balances load by construction, so the
    balancing loss is off (the seed configuration's ``moe_routing="expert_choice"`` with
    ``moe_aux_loss_weight=0``).

    Example:
        >>> upernet_fusion_moe_expert_choice().losses
        {}
    """
    base = MoEConfig(num_experts=8, top_k=2, tokens="pixel", router="expert_choice", capacity_factor=DEFAULT_CAPACITY_FACTOR,
                     losses={})
    return base.replace(**overrides)


def patchwise_segmentation_moe(**overrides: Any) -> MoEConfig:
    """Patch-wise segmentation MoE: a 3x3 grid of patches per image, two-conv GAP gate, top-2, switch loss.

    Patch-level routing in CNNs follows pMoE (Chowdhury et al., ICML 2023, arXiv:2306.04073); the
    3x3 grid is the best setting reported for segmentation by patch-wise MoE decoders.

    Example:
        >>> patchwise_segmentation_moe().tokens
        'grid:3x3'
    """
    base = MoEConfig(num_experts=8, top_k=2, tokens="grid:3x3", router="token_choice", gate="conv_gap",
                     losses={"switch": 0.01})
    return base.replace(**overrides)


def positional_conv_experts(**overrides: Any) -> MoEConfig:
    """Positional convolution experts: patch tokens, positional router, top-1 with capacity,
    residual conv experts, load-balance + z + diversity losses.

    The router sees the patch's average and max pooling plus Fourier features of its position
    (Fourier features: Tancik et al., 2020, arXiv:2006.10739); z-loss from ST-MoE (Zoph et al.,
    2022, arXiv:2202.08906). Needs a stride-1 'same' conv to replace (residual experts keep the size).

    Example:
        >>> positional_conv_experts().experts
        'residual'
    """
    base = MoEConfig(num_experts=8, top_k=1, tokens="patch:8", router="positional", capacity_factor=DEFAULT_CAPACITY_FACTOR,
                     experts="residual", losses={"switch": 0.01, "z": 0.001, "diversity": 0.01})
    return base.replace(**overrides)


def shared_expert_moe(**overrides: Any) -> MoEConfig:
    """Fine-grained routed experts plus one shared expert that every token passes through.

    Shared-expert isolation follows DeepSeekMoE (Dai et al., 2024, arXiv:2401.06066): the shared
    expert captures common features so routed experts can specialise. Per-pixel top-1 of 8 with
    the switch loss.

    Example:
        >>> shared_expert_moe().shared_expert
        True
    """
    base = MoEConfig(num_experts=8, top_k=1, tokens="pixel", router="token_choice", shared_expert=True,
                     losses={"switch": 0.01})
    return base.replace(**overrides)


PRESETS: dict[str, Callable[..., MoEConfig]] = {
    "upernet_fusion_moe": upernet_fusion_moe,
    "upernet_fusion_moe_expert_choice": upernet_fusion_moe_expert_choice,
    "patchwise_segmentation_moe": patchwise_segmentation_moe,
    "positional_conv_experts": positional_conv_experts,
    "shared_expert_moe": shared_expert_moe,
}
"""The presets by name, each a function ``(**overrides) -> MoEConfig``; see ``get_preset``.

Example:
    >>> PRESETS["shared_expert_moe"](num_experts=4).num_experts
    4
"""


def get_preset(name: str, **overrides: Any) -> MoEConfig:
    """A preset by name, with fields overridden.

    Example:
        >>> get_preset("patchwise_segmentation_moe", num_experts=4).num_experts
        4
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name](**overrides)


def list_presets() -> list[str]:
    """Names of the presets.

    Example:
        >>> "upernet_fusion_moe" in list_presets()
        True
    """
    return sorted(PRESETS)
