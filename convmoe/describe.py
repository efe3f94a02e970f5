"""``convmoe.describe``: a table of a model's MoE blocks, their cost and what they replaced.

Active FLOPs are counted analytically, in multiply-accumulates per output position of the block:

- dense conv: ``C_out * C_in / groups * kh * kw`` (the replaced conv, the reference);
- experts: ``k_eff`` experts per token plus the shared expert, each costing its weight count per
  position (for conv experts the dense conv's cost; residual experts count both their convs);
- router: the gate's weight count per token, spread over the token's positions.

``k_eff`` is ``top_k`` (token choice, positional), or ``capacity_factor * top_k`` for expert choice
(capacity 1.25 unless set). Without ``inputs`` the router cost is counted for per-pixel tokens and
left out for region tokens (it is shared by a whole region, so it is small); with ``inputs`` the
model runs once and the token counts and dispatched slots of that batch are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convmoe.block import MoEConv2d, named_blocks
from convmoe.formatting import format_count
from convmoe.routers.base import DEFAULT_CAPACITY_FACTOR
from convmoe.routers.expert_choice import ExpertChoiceRouter


@dataclass(frozen=True)
class BlockSummary:
    """One row of ``describe``.

    Attributes:
        name: Qualified module name.
        replaced: The replaced conv's geometry, e.g. ``"64->128 3x3 s2 g1 same"``.
        converter: The converter ``patch`` used (``"conv2d"``, ``"timm_conv2d_same"``), or ``"-"``.
        num_experts: E.
        top_k: Experts per token.
        k_eff: Experts per token actually computed (measured with ``inputs``).
        tokens: The tokenizer spec.
        router: The router's name.
        params_added: Parameters beyond the dense conv's.
        active_flops_ratio: Active MACs over the dense conv's MACs.

    Example:
        >>> summarize_block("0", MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=2)).active_flops_ratio  # 2 + 32/576
        2.0555...
    """

    name: str
    replaced: str
    converter: str
    num_experts: int
    top_k: int
    k_eff: float
    tokens: str
    router: str
    params_added: int
    active_flops_ratio: float


def _replaced(block: MoEConv2d) -> str:
    g = block.geometry
    parts = [f"{block.in_channels}->{block.out_channels}", "x".join(map(str, g.kernel_size))]
    if g.stride != (1, 1):
        parts.append("s" + "x".join(map(str, sorted(set(g.stride)))))
    if g.dilation != (1, 1):
        parts.append("d" + "x".join(map(str, sorted(set(g.dilation)))))
    if block.groups != 1:
        parts.append("dw" if block.groups == block.in_channels == block.out_channels else f"g{block.groups}")
    if g.dynamic_same:
        parts.append("tf-same")
    return " ".join(parts)


def shared_macs_per_position(block: MoEConv2d) -> float:
    """MACs every output position pays whatever the routing: a shared expert, and the shared base conv
    of low-rank experts.

    Example:
        >>> shared_macs_per_position(MoEConv2d(8, 4, 3, num_experts=2, experts="lowrank"))
        288.0
    """
    shared = block.shared_expert.expert_macs_per_position() if block.shared_expert is not None else 0.0
    return shared + block.experts.base_macs_per_position()


def dense_macs_per_position(block: MoEConv2d) -> int:
    """MACs of the equivalent dense conv per output position: ``C_out * C_in / groups * kh * kw``.

    Example:
        >>> dense_macs_per_position(MoEConv2d(8, 4, 3, num_experts=2))
        288
    """
    kh, kw = block.geometry.kernel_size
    return block.out_channels * (block.in_channels // block.groups) * kh * kw


def dense_params(block: MoEConv2d) -> int:
    """Parameters of the dense conv the block replaces and folds back into (weight and bias).

    Example:
        >>> dense_params(MoEConv2d(8, 4, 3, num_experts=2))
        292
    """
    return dense_macs_per_position(block) + (block.out_channels if block.has_bias else 0)


def _analytic_k_eff(block: MoEConv2d) -> float:
    c = block.config
    if isinstance(block.router, ExpertChoiceRouter):
        return min((c.capacity_factor or DEFAULT_CAPACITY_FACTOR) * c.top_k, c.num_experts)
    return float(c.top_k)


def summarize_block(name: str, block: MoEConv2d, input_size: tuple[int, int] | None = None) -> BlockSummary:
    """The :class:`BlockSummary` of one block; ``input_size`` (H, W) of its input makes the ratio exact.

    With ``input_size`` and a recorded forward pass (``block.last_routing``), ``k_eff`` is the
    measured number of dispatched slots per token.

    Example:
        >>> block = MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=1, tokens="grid:2x2")
        >>> summarize_block("b", block, input_size=(8, 8)).active_flops_ratio  # 1 + 32 * 4 tokens / 64 / 576
        1.0034...
    """
    c = block.config
    dense = dense_macs_per_position(block)
    expert = block.experts.expert_macs_per_position()
    shared = shared_macs_per_position(block)
    gate = sum(p.numel() for p in block.router.parameters() if p.dim() >= 2)
    k_eff = _analytic_k_eff(block)
    if input_size is None:
        per_token = gate if str(block.tokens) == "pixel" else 0.0
        router_per_position = per_token
    else:
        out_h, out_w = block.geometry.output_size(*input_size)
        positions = max(out_h * out_w, 1)
        rows, cols = block.tokens.edges(out_h, out_w)
        num_tokens = (len(rows) - 1) * (len(cols) - 1)
        router_per_position = gate * num_tokens / positions
        routing = block.last_routing
        if routing is not None and routing.dropped.shape[-1] == num_tokens:
            k_eff = float(routing.slot_mask.float().sum(-1).mean())
    active = k_eff * expert + shared + router_per_position
    params_added = sum(p.numel() for p in block.parameters()) - dense_params(block)
    router = c.router if isinstance(c.router, str) else type(block.router).__name__
    return BlockSummary(name=name, replaced=_replaced(block), converter=block.converter or "-",
                        num_experts=c.num_experts, top_k=c.top_k, k_eff=k_eff, tokens=str(block.tokens), router=router,
                        params_added=params_added, active_flops_ratio=active / dense)


def _input_sizes(model: nn.Module, inputs: Any) -> dict[str, tuple[int, int]]:
    """Run ``model`` once in eval mode and record every MoE block's input size."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = [block.register_forward_pre_hook(
        lambda module, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:])))
        for name, block in named_blocks(model).items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                model(**inputs)
            elif isinstance(inputs, tuple):
                model(*inputs)
            else:
                model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return sizes


def describe_blocks(model: nn.Module, inputs: Any = None) -> list[BlockSummary]:
    """One :class:`BlockSummary` per MoE block of ``model``, in module order.

    Example:
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, num_experts=2, top_k=1))
        >>> [row.name for row in describe_blocks(model)]
        ['0']
    """
    sizes = _input_sizes(model, inputs) if inputs is not None else {}
    return [summarize_block(name, block, sizes.get(name)) for name, block in named_blocks(model).items()]


def describe(model: nn.Module, inputs: Any = None) -> str:
    """A plain-text table of the MoE blocks of ``model``.

    Columns: block name, the replaced conv (``C_in->C_out kxk``, ``s2`` stride, ``dw`` depthwise,
    ``gN`` groups, ``tf-same`` dynamic padding), experts, top-k, tokens, router, parameters added
    over the dense conv, and active FLOPs over the dense conv's (see the module docstring). A
    last line gives the totals.

    Args:
        model: Any model; blocks are found wherever they are.
        inputs: Optional batch; the model runs on it once (eval mode, no grad) so the FLOPs
            ratios use the real feature-map sizes and measured routing.

    Returns:
        The table ("no MoE blocks" when there are none).

    Example:
        >>> from convmoe.patch import patch
        >>> model = patch(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), targets="2")
        >>> print(describe(model))  # doctest: +NORMALIZE_WHITESPACE
        block  replaces  experts  top-k  tokens  router        params+  active/dense
        -----  --------  -------  -----  ------  ------------  -------  ------------
        2      8->8 3x3  8        2      pixel   token_choice  4.16K    2.11
        1 MoE block(s), +4.16K parameters (+514.9% of 808 dense), active FLOPs 2.11x over the replaced convs
    """
    rows = describe_blocks(model, inputs)
    if not rows:
        return f"{type(model).__name__}: no MoE blocks"
    header = ["block", "replaces", "experts", "top-k", "tokens", "router", "params+", "active/dense"]
    cells = [[r.name, r.replaced, str(r.num_experts), str(r.top_k), r.tokens, r.router, format_count(r.params_added),
              f"{r.active_flops_ratio:.2f}"] for r in rows]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, ["-" * w for w in widths], *cells]]
    added = sum(r.params_added for r in rows)
    total = sum(p.numel() for p in model.parameters())
    dense_total = total - added
    blocks = named_blocks(model)
    dense_macs = [dense_macs_per_position(blocks[r.name]) for r in rows]
    overall = sum(r.active_flops_ratio * m for r, m in zip(rows, dense_macs, strict=True)) / sum(dense_macs)
    lines.append(f"{len(rows)} MoE block(s), +{format_count(added)} parameters (+{100 * added / max(dense_total, 1):.1f}% of "
                 f"{format_count(dense_total)} dense), active FLOPs {overall:.2f}x over the replaced convs")
    return "\n".join(lines)
