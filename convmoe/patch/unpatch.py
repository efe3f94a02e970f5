"""Fold MoE blocks back into plain convolutions (for deployment, or to undo ``patch``).

Conv experts are linear in their weights, so a fixed mixture of them is one conv:
``sum_e w_e (W_e * x + b_e) = (sum_e w_e W_e) * x + sum_e w_e b_e``. ``how="average"`` takes
``w_e = 1/E``; ``how="usage"`` takes each expert's share of the combine weight over the tokens of a
measured batch; ``how="base"`` (low-rank experts) keeps the shared conv W0 alone. A shared expert,
and the shared base conv of low-rank experts, are added with weight 1. The conv is rebuilt from
the weightless copy ``patch`` kept (so a timm ``Conv2dSame`` comes back as a ``Conv2dSame``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.block import MoEConv2d
from convmoe.scope import remove_forward_scope

HOWS = ("average", "usage", "base")


@dataclass(frozen=True)
class UnpatchReport:
    """What ``unpatch`` folded, and how much the output moved on the given batch.

    Attributes:
        modules: Qualified names of the folded blocks.
        how: ``"average"``, ``"usage"`` or ``"base"``.
        expert_weights: Mixing weight of every expert, per module (sums to 1; all 0 for ``"base"``).
        max_abs_diff: max |y_unpatched - y_patched| over the batch (None without ``inputs``).
        max_rel_diff: ``max_abs_diff`` over max |y_patched| (None without ``inputs``).

    Example:
        >>> UnpatchReport(["0"], "average", {"0": [0.5, 0.5]}).max_abs_diff is None
        True
    """

    modules: list[str]
    how: str
    expert_weights: dict[str, list[float]] = field(default_factory=dict)
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None


def _check_foldable(name: str, block: MoEConv2d, how: str) -> None:
    experts = block.experts
    capabilities = experts.capabilities
    if not capabilities.gathered_columns:
        raise TypeError(f"unpatch(): {name!r} has {type(experts).__name__} experts; only conv and low-rank experts "
                        "(experts='conv' or 'lowrank') fold into one conv.")
    if not capabilities.linear:
        raise TypeError(f"unpatch(): {name!r} has an expert norm/activation (expert_norm={block.config.expert_norm!r}, "
                        f"expert_act={block.config.expert_act!r}); a mixture of non-linear experts is not one conv.")
    shared = block.shared_expert
    if shared is not None and not (shared.capabilities.gathered_columns and shared.capabilities.linear):
        raise TypeError(f"unpatch(): {name!r} has a non-linear shared expert; it does not fold into one conv.")
    if how == "base" and not capabilities.shared_base:
        raise ValueError(f"unpatch(how='base'): {name!r} has {type(experts).__name__} experts, which have no shared "
                         "base conv; use how='average' or 'usage' (how='base' is for experts='lowrank').")


def usage_weights(block: MoEConv2d) -> Tensor:
    """Each expert's share of the combine weight over the tokens of the block's last forward pass, (E,).

    Every token counts once (per-pixel tokens: every output position), in every call of the pass (a
    shared head: every pyramid level). Falls back to the average when no token reached an expert.

    Raises:
        ValueError: The block has not run a forward pass.

    Example:
        >>> block = MoEConv2d(2, 2, 3, padding=1, num_experts=4, top_k=1)
        >>> _ = block(torch.randn(1, 2, 5, 5))
        >>> float(usage_weights(block).sum())
        1.0
    """
    if block.last_routing is None:
        where = f" {block.name!r}" if block.name else ""
        raise ValueError(f"unpatch(how='usage'): block{where} has no routing yet; pass inputs= (a batch to measure "
                         "on) or run a forward pass first.")
    totals = sum(routing.dense_weights().float().sum(dim=(0, 1)) for routing in block.forward_routings)
    if float(totals.sum()) <= 0:
        return torch.full_like(totals, 1.0 / totals.numel())
    return totals / totals.sum()


@torch.no_grad()
def fold_block(block: MoEConv2d, weights: Tensor) -> tuple[Tensor, Tensor | None]:
    """The dense (weight, bias) of a block whose experts are mixed with ``weights`` (E,), shared parts added.

    Example:
        >>> block = MoEConv2d(2, 3, 3, num_experts=2)
        >>> weight, bias = fold_block(block, torch.tensor([0.5, 0.5]))
        >>> weight.shape, bias.shape
        (torch.Size([3, 2, 3, 3]), torch.Size([3]))
    """
    weight, bias = block.experts.mixed_conv(weights)
    shared = block.shared_expert
    if shared is not None:
        shared_weight, shared_bias = shared.mixed_conv(torch.ones(1, device=weights.device))
        weight = weight + shared_weight
        if shared_bias is not None:
            bias = shared_bias if bias is None else bias + shared_bias
    return weight, bias


def _dense_conv(block: MoEConv2d, bias: bool) -> nn.Module:
    template = block.dense_template
    if template is not None:
        return copy.deepcopy(template)
    geometry = block.geometry
    if geometry.dynamic_same:
        from timm.layers import Conv2dSame

        return Conv2dSame(block.in_channels, block.out_channels, geometry.kernel_size, stride=geometry.stride,
                          dilation=geometry.dilation, groups=block.groups, bias=bias, device="meta")
    return nn.Conv2d(block.in_channels, block.out_channels, geometry.kernel_size, stride=geometry.stride,
                     padding=block.padding, dilation=geometry.dilation, groups=block.groups, bias=bias,
                     padding_mode=geometry.padding_mode, device="meta")


def _to_conv(block: MoEConv2d, weight: Tensor, bias: Tensor | None) -> nn.Module:
    conv = _dense_conv(block, bias is not None)
    requires_grad = any(p.requires_grad for p in block.experts.parameters())
    conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    elif getattr(conv, "bias", None) is not None:
        conv.bias = nn.Parameter(torch.zeros_like(weight[:, 0, 0, 0]), requires_grad=requires_grad)
    return conv.train(block.training)


def call_with_inputs(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``; a tuple is unpacked as arguments, a dict as keyword arguments.

    Example:
        >>> call_with_inputs(nn.Flatten(), (torch.zeros(1, 2, 2),)).shape
        torch.Size([1, 4])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _tensors(value)]
    return []


def _difference(before: Any, after: Any) -> tuple[float, float]:
    pairs = list(zip(_tensors(before), _tensors(after), strict=True))
    max_abs = max((float((b.float() - a.float()).abs().max()) for a, b in pairs if a.numel()), default=0.0)
    scale = max((float(a.float().abs().max()) for a, _ in pairs if a.numel()), default=0.0)
    return max_abs, (max_abs / scale if scale > 0 else 0.0)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def unpatch(model: nn.Module, how: str = "average", inputs: Any = None) -> UnpatchReport:
    """Fold every MoE block of ``model`` back into one plain convolution, in place.

    The forward scopes inside ``model`` (:mod:`convmoe.scope`, which ``patch`` adds) go with the blocks.

    Args:
        model: A model with :class:`~convmoe.block.MoEConv2d` blocks (conv or low-rank experts, no
            expert norm/activation).
        how: ``"average"``: the experts' mean; ``"usage"``: each expert weighted by its share of the
            combine weight on ``inputs`` (or, without inputs, on each block's last forward pass);
            ``"base"``: low-rank experts' shared conv W0 alone (the deltas dropped).
        inputs: A batch (tensor, tuple of arguments, or dict of keyword arguments). When given,
            the model runs on it in eval mode before and after folding, and the report gives the
            change of the outputs.

    Returns:
        An :class:`UnpatchReport`.

    Raises:
        ValueError: Unknown ``how``; no MoE block; ``how="usage"`` without routing to measure;
            ``how="base"`` on experts without a shared base conv.
        TypeError: A block with residual experts or expert norm/activation (nothing is changed).

    Example:
        >>> from convmoe.patch import patch
        >>> model = patch(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), targets="0").eval()
        >>> report = unpatch(model, inputs=torch.randn(2, 3, 8, 8))
        >>> type(model[0]).__name__, report.modules, report.max_abs_diff < 1e-5
        ('Conv2d', ['0'], True)
    """
    if how not in HOWS:
        raise ValueError(f"unpatch(): how={how!r} is not one of {', '.join(HOWS)}.")
    blocks = {name: module for name, module in model.named_modules() if isinstance(module, MoEConv2d)}
    if not blocks:
        raise ValueError("unpatch(): the model has no MoEConv2d block to fold.")
    for name, block in blocks.items():
        _check_foldable(name, block, how)

    before = None
    was_training = model.training
    if inputs is not None:
        model.eval()
        with torch.no_grad():
            before = call_with_inputs(model, inputs)

    weights = {}
    for name, block in blocks.items():
        E, device = block.config.num_experts, next(block.experts.parameters()).device
        if how == "usage":
            weights[name] = usage_weights(block)
        else:
            weights[name] = torch.full((E,), 1.0 / E if how == "average" else 0.0, device=device)
    for name, block in blocks.items():
        _set_submodule(model, name, _to_conv(block, *fold_block(block, weights[name])))
    for module in model.modules():  # no MoE block is left to scope
        remove_forward_scope(module)

    report = UnpatchReport(list(blocks), how, {name: [float(w) for w in value] for name, value in weights.items()})
    if inputs is not None:
        with torch.no_grad():
            after = call_with_inputs(model, inputs)
        model.train(was_training)
        max_abs, max_rel = _difference(before, after)
        report = UnpatchReport(report.modules, how, report.expert_weights, max_abs, max_rel)
    return report
