"""``convmoe.flops``: active FLOPs of a model with MoE blocks, next to its dense equivalent, with fvcore.

fvcore (``FlopCountAnalysis``) traces a model with ``torch.jit`` and counts each operator; an MoE
block's data-dependent dispatch does not trace into a meaningful graph, and a trace would count
whatever the dispatcher happens to compute (every expert, for the dense reference). So each
:class:`~convmoe.MoEConv2d` is a leaf here:

1. the model runs once with forward hooks that record every block's input, output and routing;
2. fvcore counts the rest of the model with each block swapped for a stand-in that returns the
   recorded output (zero FLOPs);
3. each block is counted from its routing: the gate (traced by fvcore on the block's tokens), the
   experts each token really visits (``dispatched slots x`` fvcore's count of one expert on one
   token's window), and the shared expert; its dense equivalent is fvcore's count of the conv it
   replaces, on the same input.

Convention (fvcore's): one fused multiply-add counts as one flop, i.e. the numbers are MACs;
softmax, top-k, activations and the dispatch's gathers are not counted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.block import MoEConv2d, named_blocks
from convmoe.dispatch import DenseDispatcher, SparseDispatcher
from convmoe.dispatch.deltas import is_factored, mixed_deltas
from convmoe.dispatch.dense import position_weights
from convmoe.dispatch.merged import merged_conv
from convmoe.dispatch.tiles import sizes
from convmoe.fvcore_tracing import (
    GateCall,
    KernelCall,
    MethodCall,
    RecordedOutputs,
    count_flops,
    fvcore_nn,
)

CONVENTION = "fvcore: one fused multiply-add = one flop (MACs); softmax, top-k, activations, gathers not counted"


@dataclass(frozen=True)
class BlockFlops:
    """The FLOPs of one MoE block for one forward pass (summed over its calls).

    Attributes:
        active: ``gate + experts + shared + base``: what routing really asks for.
        dense: The replaced conv on the same input (the dense equivalent).
        gate: The router's gate.
        experts: The experts each token visits (dispatched slots only; low-rank experts: their deltas).
        shared: The shared expert (0 without one).
        all_experts: Every expert on every token (what the dense reference dispatcher computes).
        dispatched_slots: (token, expert) pairs dispatched.
        tokens: Routed tokens (B * N).
        base: The shared base conv W0 of low-rank experts, on every position (0 for other experts).
        executed: What the dispatcher's path really computed: the merged path one conv per image plus
            the mixing of the used experts' weights (fewer than ``active``), the deltas path every
            expert's rank-r factors on every position (more than ``active``), the dense reference every
            expert; the gathered and regions paths compute ``active``.

    Example:
        >>> BlockFlops(10, 8, 1, 9, 0, 36, 2, 2).active
        10
    """

    active: int
    dense: int
    gate: int
    experts: int
    shared: int
    all_experts: int
    dispatched_slots: int
    tokens: int
    base: int = 0
    executed: int = 0


@dataclass(frozen=True)
class FlopReport:
    """Active and dense-equivalent FLOPs and parameters of a model, in total and per module.

    Attributes:
        active: FLOPs of the model with its MoE blocks counted at their active cost.
        dense: FLOPs of the dense equivalent (every block replaced by the conv it replaces).
        params: Parameters of the model (every expert included).
        dense_params: Parameters of the dense equivalent.
        by_module: Active FLOPs per module name ("" is the model); an MoE block also has rows
            ``<block>.router``, ``<block>.experts`` and ``<block>.shared_expert``.
        dense_by_module: Dense-equivalent FLOPs per module name.
        params_by_module: Parameters per module name.
        blocks: The detail of every MoE block by name.
        convention: How FLOPs are counted.
        executed: FLOPs of the model with its MoE blocks counted as their dispatch paths ran
            (:attr:`BlockFlops.executed`): the cost of this inference, where ``active`` is the
            definition (k experts per token).

    Example:
        >>> report = flops(nn.Sequential(MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=1)),
        ...                torch.randn(1, 4, 8, 8))
        >>> report.blocks["0"].experts == report.blocks["0"].dense
        True
    """

    active: int
    dense: int
    params: int
    dense_params: int
    by_module: dict[str, int]
    dense_by_module: dict[str, int]
    params_by_module: dict[str, int]
    blocks: dict[str, BlockFlops]
    convention: str = field(default=CONVENTION)
    executed: int = 0

    def table(self, max_depth: int = 3) -> str:
        """A per-module table (module, parameters, active FLOPs, dense FLOPs) down to ``max_depth``.

        Example:
            >>> report = flops(nn.Sequential(MoEConv2d(4, 4, 3, padding=1)), torch.randn(1, 4, 8, 8))
            >>> "0.experts" in report.table()
            True
        """
        names = list(self.by_module) + [name for name in self.params_by_module if name not in self.by_module]
        rows = [("module", "#parameters", "active FLOPs", "dense FLOPs")]
        for name in names:
            depth = 0 if name == "" else name.count(".") + 1
            if depth > max_depth:
                continue
            rows.append(("  " * depth + (name or "model"), _si(self.params_by_module.get(name, 0)),
                         _si(self.by_module.get(name, 0)), _si(self.dense_by_module.get(name, 0))))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [" | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                            enumerate(zip(row, widths, strict=True))) for row in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines) + f"\n({self.convention})"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3f}{unit}"
    return str(int(value))


def _executed_kernel(block: MoEConv2d, x_pad: Tensor, source: Tensor, routing: Any,
                     out_size: tuple[int, int]) -> int | None:
    """fvcore's count of the kernel the block's dispatcher ran, for the paths whose cost is not the
    routed tokens' (shared base included); None for the gathered and regions paths and other dispatchers."""
    experts, dispatcher, tokens = block.experts, block.dispatcher, block.tokens.split(source)
    if isinstance(dispatcher, SparseDispatcher):
        path = dispatcher.choose_path(tokens, experts, routing.slots)
    elif isinstance(dispatcher, DenseDispatcher) and is_factored(experts):
        path = "deltas"
    else:
        return None
    if path == "merged":
        # what eager mode runs on this device (the count traces, and a trace alone would mix every expert)
        return count_flops(KernelCall(merged_conv, experts, routing.dense_weights()[:, 0],
                                      select_used=x_pad.device.type == "cpu"), x_pad)
    if path == "deltas":
        weight_map = position_weights(tokens, routing, out_size)
        return count_flops(KernelCall(mixed_deltas, experts, weight_map, with_base=True), x_pad)
    return None


def _token_sizes(block: MoEConv2d, out_size: tuple[int, int]) -> tuple[list[int], list[int]]:
    rows, cols = block.tokens.edges(*out_size)
    return sizes(rows), sizes(cols)


def _expert_flops_per_token(block: MoEConv2d, x: Tensor, out_size: tuple[int, int]) -> Tensor:
    """fvcore's count of one expert on each token's window, (N,) int64."""
    g, experts = block.geometry, block.experts
    row_sizes, col_sizes = _token_sizes(block, out_size)
    counts = [1] + [0] * (experts.num_experts - 1)
    cache: dict[tuple[int, int], int] = {}
    per_token = []
    for h in row_sizes:
        for w in col_sizes:
            if (h, w) not in cache:
                window = ((h - 1) * g.stride[0] + g.span[0], (w - 1) * g.stride[1] + g.span[1])
                probe = x.new_zeros(1, x.shape[1], *window)
                cache[h, w] = count_flops(MethodCall(experts, "forward_segments", counts), probe)
            per_token.append(cache[h, w])
    return torch.tensor(per_token, dtype=torch.int64)


def _dense_conv(block: MoEConv2d) -> nn.Conv2d:
    g = block.geometry
    return nn.Conv2d(block.in_channels, block.out_channels, g.kernel_size, stride=g.stride, dilation=g.dilation,
                     groups=block.groups, bias=block.has_bias, device="meta")


def _dense_flops(block: MoEConv2d, x_pad: Tensor) -> int:
    conv = _dense_conv(block).to_empty(device=x_pad.device).to(x_pad.dtype)
    return count_flops(conv, x_pad)


def block_flops(block: MoEConv2d, x: Tensor, routing) -> BlockFlops:
    """The FLOPs of ``block`` on input ``x`` (B, C_in, H, W) routed by ``routing`` (its ``last_routing``).

    Example:
        >>> block = MoEConv2d(4, 8, 3, padding=1, num_experts=4, top_k=2, tokens="grid:2x2").eval()
        >>> x = torch.randn(2, 4, 6, 6)
        >>> _ = block(x)
        >>> counted = block_flops(block, x, block.last_routing)
        >>> counted.experts == 2 * counted.dense  # two experts per token, each a full conv
        True
    """
    with torch.no_grad():
        out_size = block.geometry.output_size(*x.shape[-2:])
        x_pad = block.geometry.pad(x)
        per_token = _expert_flops_per_token(block, x_pad, out_size)  # (N,)
        slots = routing.slot_mask.sum(dim=(0, 2)).cpu()  # dispatched slots per token, (N,)
        experts = int((slots * per_token).sum())
        B = x.shape[0]
        all_experts = int(per_token.sum()) * B * block.experts.num_experts
        source = block.geometry.centre_sample(x_pad, out_size)
        gate = count_flops(GateCall(block.router, block.tokens), source)
        shared = base = 0
        if block.shared_expert is not None:
            shared = count_flops(MethodCall(block.shared_expert, "forward_segments", [B]), x_pad)
        if block.experts.capabilities.shared_base:
            base = count_flops(MethodCall(block.experts, "forward_base"), x_pad)
        dense = _dense_flops(block, x_pad)
        kernel = _executed_kernel(block, x_pad, source, routing, out_size)
    if kernel is None:  # the routed tokens' experts, or every expert for the dense reference
        kernel = (all_experts if isinstance(block.dispatcher, DenseDispatcher) else experts) + base
    return BlockFlops(active=gate + experts + shared + base, dense=dense, gate=gate, experts=experts, shared=shared,
                      all_experts=all_experts, dispatched_slots=int(slots.sum()), tokens=B * per_token.numel(),
                      base=base, executed=gate + kernel + shared)


def _ancestors(name: str) -> list[str]:
    if not name:
        return [""]
    parts = name.split(".")
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def flops(model: nn.Module, inputs: Tensor | tuple[Tensor, ...]) -> FlopReport:
    """Active FLOPs of ``model`` on ``inputs`` (router + the experts each token visits + shared
    expert), its dense-equivalent FLOPs and parameter counts, in total and per module.

    The model runs twice (a recording pass and fvcore's trace), under ``torch.no_grad``; in
    training mode batch-norm statistics update as on any forward pass, so call ``model.eval()``
    for inference counts. The counts are for the whole batch of ``inputs``. ``active`` follows the
    definition (k experts per token); ``executed`` counts what the dispatch paths really ran: an
    image-token block on the ``merged`` path computes one mixture of its experts per image (about
    one conv, fewer FLOPs than ``active``), low-rank experts on the ``deltas`` path every expert's
    factors on every position (more).

    Args:
        model: Any module; its :class:`~convmoe.MoEConv2d` blocks are counted from their routing.
        inputs: The model's input tensor, or a tuple of them.

    Returns:
        A :class:`FlopReport`; ``report.table()`` prints the per-module table.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
        ...                       MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=2))
        >>> report = flops(model.eval(), torch.randn(1, 3, 16, 16))
        >>> report.blocks["1"].dense == 8 * 8 * 9 * 16 * 16
        True
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    blocks = named_blocks(model)
    records: dict[str, list[tuple[Tensor, Tensor, Any]]] = defaultdict(list)

    def recorder(name: str):
        def hook(block: MoEConv2d, args: tuple[Tensor, ...], output: Tensor) -> None:
            records[name].append((args[0].detach(), output.detach(), block.last_routing))
        return hook

    handles = [block.register_forward_hook(recorder(name)) for name, block in blocks.items()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    counted: dict[str, BlockFlops] = {}
    for name, calls in records.items():
        parts = [block_flops(blocks[name], x, routing) for x, _, routing in calls]
        counted[name] = BlockFlops(*(sum(getattr(p, f) for p in parts) for f in BlockFlops.__dataclass_fields__))

    rest = _count_without_blocks(model, inputs, blocks,
                                 {name: [out for _, out, _ in calls] for name, calls in records.items()})
    by_module, dense_by_module = Counter(rest), Counter(rest)
    for name, c in counted.items():
        for ancestor in _ancestors(name):
            by_module[ancestor] += c.active
            dense_by_module[ancestor] += c.dense
        for part, value in (("router", c.gate), ("experts", c.experts + c.base), ("shared_expert", c.shared)):
            if hasattr(blocks[name], part) and getattr(blocks[name], part) is not None:
                by_module[f"{name}.{part}"] = value
                dense_by_module[f"{name}.{part}"] = 0

    # modules only (parameter_count also lists parameters), and inside a block only its main parts
    inside_block = tuple(f"{name}." if name else "" for name in blocks)
    params = {name: count for name, count in fvcore_nn().parameter_count(model).items()
              if name in by_module or (name in dict(model.named_modules()) and not name.startswith(inside_block))}
    outermost = [name for name in blocks if not any(name.startswith(f"{other}.") for other in blocks if other != name)]
    block_params = sum(params.get(name, 0) for name in outermost)
    dense_block_params = sum(sum(p.numel() for p in _dense_conv(blocks[name]).parameters()) for name in outermost)
    total_params = params.get("", 0)
    # rows in the model's module order, each block followed by its parts
    order = [name for name, _ in model.named_modules() if name in by_module or name in params]
    order += [name for name in by_module if name not in order]
    executed = by_module[""] - sum(c.active for c in counted.values()) + sum(c.executed for c in counted.values())
    return FlopReport(
        active=by_module[""], dense=dense_by_module[""], params=total_params, executed=executed,
        dense_params=total_params - block_params + dense_block_params,
        by_module={name: by_module.get(name, 0) for name in order},
        dense_by_module={name: dense_by_module.get(name, 0) for name in order},
        params_by_module={name: params.get(name, 0) for name in order}, blocks=counted,
    )


def _count_without_blocks(model: nn.Module, inputs: tuple[Tensor, ...], blocks: dict[str, nn.Module],
                          outputs: dict[str, list[Tensor]]) -> dict[str, int]:
    """fvcore's per-module FLOPs of ``model`` with every recorded MoE block replaced by a stand-in."""
    if isinstance(model, MoEConv2d):  # the model is a block: nothing else to count
        return {"": 0}
    stand_ins = {id(blocks[name]): RecordedOutputs(outs) for name, outs in outputs.items()}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in stand_ins:
                swapped.append((parent, child_name, child))
                setattr(parent, child_name, stand_ins[id(child)])
    try:
        analysis = fvcore_nn().FlopCountAnalysis(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        with torch.no_grad():
            return dict(analysis.by_module())
    finally:
        for parent, child_name, block in swapped:
            setattr(parent, child_name, block)
