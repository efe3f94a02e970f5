"""UPerNet (smp) whose decoder fusion block and/or FPN conv blocks are MoE blocks."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base.hub_mixin import supports_config_loading
from torch import nn

from convmoe.block import MoEConv2d
from convmoe.config import MoEConfig
from convmoe.dropout.medoe import MEDOE_DROP_RATE
from convmoe.experts.conv import ConvExperts
from convmoe.experts.lowrank import LowRankExperts
from convmoe.presets import upernet_fusion_moe, upernet_fusion_moe_expert_choice
from convmoe.routers.base import DEFAULT_CAPACITY_FACTOR
from convmoe.trust import register_factory

ROUTINGS = ("token_choice", "expert_choice")


def upernet_moe_config(routing: str = "token_choice", num_experts: int = 8, top_k: int = 2,
                       noise_std: float = 1.0, capacity_factor: float = DEFAULT_CAPACITY_FACTOR, use_shared_expert: bool = False,
                       aux_loss_weight: float = 0.01, overrides: dict[str, Any] | None = None) -> MoEConfig:
    """The MoEConfig of a UPerNetMoE decoder block, from the model's ``moe_*`` keywords.

    Token choice starts from :func:`convmoe.presets.upernet_fusion_moe` (no capacity limit, so
    ``capacity_factor`` does not apply; set ``overrides={"capacity_factor": ...}`` to limit it),
    expert choice from :func:`convmoe.presets.upernet_fusion_moe_expert_choice` with
    ``capacity_factor``. ``aux_loss_weight`` is the weight of the switch loss (none when 0).

    Args:
        routing: ``"token_choice"`` or ``"expert_choice"``.
        num_experts: Experts per block.
        top_k: Experts per token (token choice) or mean experts per token (expert choice capacity).
        noise_std: Router noise in training (token choice).
        capacity_factor: Expert capacity multiplier (expert choice).
        use_shared_expert: Add a dense expert every position also passes through.
        aux_loss_weight: Weight of the switch load-balancing loss.
        overrides: Any other :class:`~convmoe.MoEConfig` fields, applied last.

    Raises:
        ValueError: Unknown routing or an invalid field.

    Example:
        >>> upernet_moe_config("expert_choice", aux_loss_weight=0.0).capacity_factor
        1.25
        >>> upernet_moe_config(overrides={"dropout": "medoe", "drop_rate": 0.25}).drop_rate
        0.25
    """
    if routing not in ROUTINGS:
        raise ValueError(f"moe_routing={routing!r} is not supported; use one of {', '.join(ROUTINGS)}.")
    losses = {"switch": aux_loss_weight} if aux_loss_weight > 0 else {}
    fields: dict[str, Any] = {"num_experts": num_experts, "top_k": top_k, "shared_expert": use_shared_expert,
                              "losses": losses}
    if routing == "token_choice":
        config = upernet_fusion_moe(noise_std=noise_std, **fields)
    else:
        config = upernet_fusion_moe_expert_choice(capacity_factor=capacity_factor, **fields)
    return config.replace(**(overrides or {}))


def _init_like_smp_decoder(block: MoEConv2d) -> None:
    # smp initialises decoder convs with Kaiming-uniform (fan_in, relu) and zero bias; each expert
    # gets its own draw so experts start different, as in an MoE trained from scratch. Low-rank
    # experts: their shared conv is the decoder conv (the deltas start at zero).
    for module in block.modules():
        with torch.no_grad():
            if isinstance(module, ConvExperts):
                for e in range(module.num_experts):
                    nn.init.kaiming_uniform_(module.weight[e], mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, LowRankExperts):
                nn.init.kaiming_uniform_(module.base_weight, mode="fan_in", nonlinearity="relu")
                if module.base_bias is not None:
                    module.base_bias.zero_()


def replace_conv_with_moe(conv_block: nn.Sequential, config: MoEConfig, name: str) -> MoEConv2d:
    """Swap the conv of an smp ``Conv2dReLU`` (conv, norm, activation) for an MoE block, in place.

    Args:
        conv_block: The ``Conv2dReLU``; its first module must be an ``nn.Conv2d``.
        config: Settings of the new block.
        name: Qualified name of the conv, used in the block's error messages.

    Returns:
        The new block (now ``conv_block[0]``).

    Example:
        >>> from segmentation_models_pytorch.base.modules import Conv2dReLU
        >>> block = Conv2dReLU(8, 8, kernel_size=3, padding=1)
        >>> type(replace_conv_with_moe(block, MoEConfig(num_experts=4), "fusion")).__name__
        'MoEConv2d'
    """
    conv = conv_block[0]
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name}: expected an nn.Conv2d to replace, got {type(conv).__name__}.")
    block = MoEConv2d.from_conv(conv, config, upcycle=False)
    _init_like_smp_decoder(block)
    block.name = name
    conv_block[0] = block
    return block


def _config_instead_of_keywords(moe_config: MoEConfig | dict[str, Any] | str, keywords: dict[str, Any],
                                overrides: dict[str, Any] | None) -> MoEConfig:
    """``moe_config`` coerced, refusing ``moe_*`` keywords changed from their defaults alongside it."""
    defaults = inspect.signature(UPerNetMoE.__init__).parameters
    changed = sorted(name for name, value in keywords.items() if value != defaults[name].default)
    if changed:
        raise ValueError(f"UPerNetMoE got moe_config and {', '.join(changed)}; pass the MoE settings one way: put "
                         "them in moe_config (or moe_overrides), or leave moe_config out.")
    return MoEConfig.coerce(moe_config, where="moe_config").replace(**(overrides or {}))


@register_factory  # a model builder a downloaded recipe may name
class UPerNetMoE(smp.UPerNet):
    """smp's UPerNet with MoE blocks in its decoder: the fusion block and/or the FPN conv blocks.

    Any smp encoder works (``tu-`` timm encoders included). The conv of each chosen
    ``Conv2dReLU`` becomes a :class:`~convmoe.MoEConv2d` (its norm and ReLU stay), built from
    :func:`upernet_moe_config`. Balancing losses and routing statistics are collected by
    :func:`convmoe.aux_loss` and :func:`convmoe.routing_stats`; smp's Hub methods
    (``save_pretrained``, ``from_pretrained``, ``push_to_hub``) are kept and record every keyword.

    ``encoder_name``, ``encoder_depth``, ``encoder_weights``, ``decoder_channels``, ``decoder_use_norm``,
    ``in_channels``, ``classes``, ``activation``, ``upsampling`` and ``aux_params`` are as in ``smp.UPerNet``.

    Args:
        moe_num_experts: Experts per MoE block.
        moe_top_k: Experts per position (token choice); mean experts per position (expert choice).
        moe_noise_std: Router noise std in training (token choice).
        moe_capacity_factor: Expert capacity multiplier; applies to expert choice (token choice is
            unlimited unless ``moe_overrides={"capacity_factor": ...}``).
        moe_use_shared_expert: Add a dense expert alongside the routed experts.
        moe_routing: ``"token_choice"`` or ``"expert_choice"``.
        moe_aux_loss_weight: Weight of the switch load-balancing loss; use 0 with expert choice.
        moe_at_fusion: MoE at the fusion block.
        moe_at_fpn: MoE at every FPN conv block.
        moe_overrides: Other :class:`~convmoe.MoEConfig` fields (e.g. ``{"tokens": "grid:3x3"}``).
        moe_config: The whole MoE setting instead of the ``moe_*`` keywords above: an
            :class:`~convmoe.MoEConfig`, a dict of its fields or a preset name
            (:meth:`~convmoe.MoEConfig.coerce`); ``moe_overrides`` still apply on top. The seed
            keywords stay for the configs that use them; giving both is an error.
        **kwargs: Passed to the encoder, as in smp.

    Raises:
        ValueError: Unknown routing or invalid MoE settings.

    Example:
        >>> model = UPerNetMoE("tu-test_resnet", encoder_weights=None, classes=3, decoder_channels=16,
        ...                    moe_num_experts=4)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
        >>> from convmoe import routing_stats
        >>> list(routing_stats(model).blocks)
        ['decoder.fusion_block.0']
    """

    @supports_config_loading
    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: str | None = "imagenet",
        decoder_channels: int = 256,
        decoder_use_norm: bool | str | dict[str, Any] = "batchnorm",
        in_channels: int = 3,
        classes: int = 1,
        activation: str | Callable | None = None,
        upsampling: int = 4,
        aux_params: dict | None = None,
        moe_num_experts: int = 8,
        moe_top_k: int = 2,
        moe_noise_std: float = 1.0,
        moe_capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
        moe_use_shared_expert: bool = False,
        moe_routing: str = "token_choice",
        moe_aux_loss_weight: float = 0.01,
        moe_at_fusion: bool = True,
        moe_at_fpn: bool = False,
        moe_overrides: dict[str, Any] | None = None,
        moe_config: MoEConfig | dict[str, Any] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder_name=encoder_name, encoder_depth=encoder_depth, encoder_weights=encoder_weights,
                         decoder_channels=decoder_channels, decoder_use_norm=decoder_use_norm,
                         in_channels=in_channels, classes=classes, activation=activation, upsampling=upsampling,
                         aux_params=aux_params, **kwargs)
        if moe_routing == "expert_choice" and moe_aux_loss_weight > 0:
            warnings.warn(f"moe_aux_loss_weight={moe_aux_loss_weight} with expert_choice routing: expert choice "
                          "balances load by construction; set moe_aux_loss_weight=0.", UserWarning, stacklevel=3)
        keywords = {"moe_num_experts": moe_num_experts, "moe_top_k": moe_top_k, "moe_noise_std": moe_noise_std,
                    "moe_capacity_factor": moe_capacity_factor, "moe_use_shared_expert": moe_use_shared_expert,
                    "moe_routing": moe_routing, "moe_aux_loss_weight": moe_aux_loss_weight}
        if moe_config is not None:
            self.moe_config = _config_instead_of_keywords(moe_config, keywords, moe_overrides)
            if isinstance(getattr(self, "_hub_mixin_config", None), dict):  # saved by smp's Hub methods as JSON
                self._hub_mixin_config["moe_config"] = self.moe_config.to_dict()
        else:
            self.moe_config = upernet_moe_config(
                routing=moe_routing, num_experts=moe_num_experts, top_k=moe_top_k, noise_std=moe_noise_std,
                capacity_factor=moe_capacity_factor, use_shared_expert=moe_use_shared_expert,
                aux_loss_weight=moe_aux_loss_weight, overrides=moe_overrides)
        self.moe_aux_loss_weight = moe_aux_loss_weight
        if not (moe_at_fusion or moe_at_fpn):
            warnings.warn("moe_at_fusion=False and moe_at_fpn=False: the model has no MoE block.", UserWarning,
                          stacklevel=3)
        if moe_at_fusion:
            replace_conv_with_moe(self.decoder.fusion_block, self.moe_config, "decoder.fusion_block.0")
        if moe_at_fpn:
            for i, conv_block in enumerate(self.decoder.fpn_conv_blocks):
                replace_conv_with_moe(conv_block, self.moe_config, f"decoder.fpn_conv_blocks.{i}.0")
        self.name = f"upernet-moe-{encoder_name}"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> UPerNetMoE:
        """Load a model saved with ``save_pretrained`` (a folder or a Hub id).

        The saved weights replace the encoder's, so no ImageNet weights are fetched
        (``encoder_weights=None``), and loading is strict: every key must match.

        Example:
            >>> model = UPerNetMoE("tu-test_resnet", encoder_weights=None, classes=2, decoder_channels=16)
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     model.save_pretrained(folder)
            ...     type(UPerNetMoE.from_pretrained(folder)).__name__  # doctest: +ELLIPSIS
            Loading weights from local directory
            'UPerNetMoE'
        """
        kwargs.setdefault("encoder_weights", None)
        kwargs.setdefault("strict", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


@register_factory
class UPerNetMEDoE(UPerNetMoE):
    """:class:`UPerNetMoE` with MEDoE expert dropout: each training forward pass removes
    ``round(medoe_drop_rate * moe_num_experts)`` random experts from routing (at most
    ``E - top_k``); eval is unaffected.

    Training with the engine logs ``extra/train_medoe_expert_utilization`` (share of the kept
    experts that received tokens) and ``extra/train_medoe_expert_entropy``.

    Args:
        medoe_drop_rate: Fraction of experts dropped per training forward pass, in [0, 1).
        **kwargs: As in :class:`UPerNetMoE`, like every other argument.

    Example:
        >>> model = UPerNetMEDoE("tu-test_resnet", encoder_weights=None, classes=3, decoder_channels=16,
        ...                      moe_num_experts=8, medoe_drop_rate=0.25)
        >>> _ = model.train()(torch.randn(2, 3, 64, 64))
        >>> from convmoe import routing_stats
        >>> routing_stats(model)["decoder.fusion_block.0"].medoe_expert_utilization is not None
        True
    """

    @supports_config_loading
    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: str | None = "imagenet",
        decoder_channels: int = 256,
        decoder_use_norm: bool | str | dict[str, Any] = "batchnorm",
        in_channels: int = 3,
        classes: int = 1,
        activation: str | Callable | None = None,
        upsampling: int = 4,
        aux_params: dict | None = None,
        moe_num_experts: int = 8,
        moe_top_k: int = 2,
        moe_noise_std: float = 1.0,
        moe_capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
        moe_use_shared_expert: bool = False,
        moe_routing: str = "token_choice",
        moe_aux_loss_weight: float = 0.01,
        moe_at_fusion: bool = True,
        moe_at_fpn: bool = False,
        moe_overrides: dict[str, Any] | None = None,
        medoe_drop_rate: float = MEDOE_DROP_RATE,
        moe_config: MoEConfig | dict[str, Any] | str | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= medoe_drop_rate < 1.0:
            raise ValueError(f"medoe_drop_rate={medoe_drop_rate} must be in [0, 1).")
        if medoe_drop_rate > 0:
            moe_overrides = {**(moe_overrides or {}), "dropout": "medoe", "drop_rate": medoe_drop_rate}
        super().__init__(
            encoder_name=encoder_name, encoder_depth=encoder_depth, encoder_weights=encoder_weights,
            decoder_channels=decoder_channels, decoder_use_norm=decoder_use_norm, in_channels=in_channels,
            classes=classes, activation=activation, upsampling=upsampling, aux_params=aux_params,
            moe_num_experts=moe_num_experts, moe_top_k=moe_top_k, moe_noise_std=moe_noise_std,
            moe_capacity_factor=moe_capacity_factor, moe_use_shared_expert=moe_use_shared_expert,
            moe_routing=moe_routing, moe_aux_loss_weight=moe_aux_loss_weight, moe_at_fusion=moe_at_fusion,
            moe_at_fpn=moe_at_fpn, moe_overrides=moe_overrides, moe_config=moe_config, **kwargs)
        self.medoe_drop_rate = medoe_drop_rate
        self.name = f"upernet-medoe-{encoder_name}"
