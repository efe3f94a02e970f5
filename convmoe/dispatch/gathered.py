"""The gathered path: conv experts as matrix products over the receptive fields of routed positions.

Every output position of every routed tile becomes a row of its receptive field, (kh, kw, C_in),
gathered from the channels-last padded input and sorted by expert; all experts then run as one
grouped matrix product (``grouped_mm`` on GPU, no host sync; a cache-sized chunk at a time on CPU).
Per-pixel tokens have 1x1 tiles, so the canvas of tiles is the feature map itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convmoe.dispatch.assignments import Assignments
from convmoe.dispatch.formats import wants_channels_last
from convmoe.dispatch.grouped import GatheredColumns, compute_dtype, gathered_segment_matmul, segment_matmul
from convmoe.dispatch.tiles import TileLayout, channels_last_rows, combine_tiles, grid_offsets, window_origins
from convmoe.experts.base import ExpertBank, StackedConv
from convmoe.types import Tokens


def gathered_experts(experts: ExpertBank, columns: Tensor | GatheredColumns, counts: Tensor | list[int]) -> Tensor:
    """Expert e's conv (and post-ops) on the e-th segment of receptive-field columns, (M, C_out).

    Args:
        experts: A bank with ``capabilities.gathered_columns`` (read through ``stacked_conv()``).
        columns: One receptive field per output position, sorted by expert: (M, C_in * kh * kw)
            in ``F.unfold``'s order, (M, kh * kw, C_in) as gathered from a channels-last map,
            or ``GatheredColumns`` saying where to read the latter.
        counts: Rows of each expert, (E,) int tensor or list.

    Example:
        >>> from convmoe.experts import ConvExperts
        >>> from convmoe.geometry import ConvGeometry
        >>> experts = ConvExperts(2, 3, num_experts=2, geometry=ConvGeometry.create(3))
        >>> gathered_experts(experts, torch.randn(5, 18), [2, 3]).shape
        torch.Size([5, 3])
        >>> gathered_experts(experts, torch.randn(5, 9, 2), torch.tensor([2, 3])).shape
        torch.Size([5, 3])
    """
    conv = experts.stacked_conv()
    if isinstance(columns, GatheredColumns) and (conv.groups != 1 or columns.rows.device.type != "cpu"):
        columns = columns.materialize()
    channels_last = not isinstance(columns, Tensor) or columns.dim() == 3
    M, E, C_out = columns.shape[0], experts.num_experts, experts.out_channels
    if conv.groups == 1:
        if isinstance(columns, GatheredColumns):
            counts = counts.tolist() if isinstance(counts, Tensor) else counts
            # few rows and large weights (deep layers, small batches): transpose the columns
            # rather than reorder the experts' weights (E x C_out x K) on every call
            channels_first = E * conv.weight.shape[1] >= M
            weight = conv.column_weight(channels_last=not channels_first).to(columns.rows.dtype)
            y = gathered_segment_matmul(columns, weight, counts, channels_first=channels_first)
        else:
            y = segment_matmul(columns.flatten(1), conv.column_weight(channels_last).to(columns.dtype), counts)
        if conv.up is not None:  # factored experts: (M, r) -> (M, C_out)
            y = segment_matmul(y, conv.up.transpose(1, 2).to(y.dtype), counts)
        counts = torch.as_tensor(counts, device=y.device)
        if conv.bias is not None:
            y = y + conv.bias.to(y.dtype).repeat_interleave(counts, dim=0, output_size=M)
        return conv.post.forward_rows(y, counts) if not conv.post.is_identity else y
    counts = counts.tolist() if isinstance(counts, Tensor) else counts
    if conv.groups == experts.in_channels == C_out:
        return _depthwise(conv, columns, counts, channels_last)
    return _grouped(conv, columns, counts, channels_last, experts.in_channels)


def _finish_rows(conv: StackedConv, y: Tensor, bias: Tensor | None, expert: int) -> Tensor:
    """Expert ``expert``'s bias and post-ops on its output rows (M, C_out)."""
    if bias is not None:
        y = y + bias.to(y.dtype)
    return conv.post.forward_rows(y, expert) if not conv.post.is_identity else y


def _grouped(conv: StackedConv, columns: Tensor, counts: list[int], channels_last: bool, in_channels: int) -> Tensor:
    """Grouped (not depthwise) experts on columns: one batched product over groups per expert, (M, C_out)."""
    E, C_out, groups = conv.weight.shape[0], conv.weight.shape[1], conv.groups
    M, out_per_group = columns.shape[0], C_out // groups
    if channels_last:  # (M, T, C_in) -> (M, groups, T * C_in / groups), as the weight below
        columns = columns.reshape(M, -1, groups, in_channels // groups).transpose(1, 2)
    columns = columns.reshape(M, groups, -1)
    weights = (conv.weight if not channels_last else conv.weight.permute(0, 1, 3, 4, 2)).unbind(0)
    biases = conv.bias.unbind(0) if conv.bias is not None else [None] * E
    outputs = []
    for e, segment in enumerate(columns.split(counts)):
        if segment.shape[0] == 0:
            continue
        weight = weights[e].reshape(groups, out_per_group, -1).to(segment.dtype)
        y = torch.einsum("mgk,gok->mgo", segment, weight).reshape(segment.shape[0], C_out)
        outputs.append(_finish_rows(conv, y, biases[e], e))
    if not outputs:
        return columns.new_zeros(0, C_out)
    return torch.cat(outputs)


def _depthwise(conv: StackedConv, columns: Tensor, counts: list[int], channels_last: bool) -> Tensor:
    """Depthwise experts on columns: a weighted sum over the taps per channel (a batched product of
    one-row matrices per channel would be far slower), (M, C)."""
    E, C = conv.weight.shape[:2]
    taps = columns.reshape(columns.shape[0], -1, C) if channels_last else columns.reshape(
        columns.shape[0], C, -1).transpose(1, 2)  # (M, T, C)
    weights = conv.weight.flatten(1).reshape(E, C, -1).transpose(1, 2).unbind(0)  # (T, C) each
    biases = conv.bias.unbind(0) if conv.bias is not None else [None] * E
    outputs = []
    for e, segment in enumerate(taps.split(counts)):
        if segment.shape[0] == 0:
            continue
        y = (segment * weights[e].to(segment.dtype)).sum(dim=1)
        outputs.append(_finish_rows(conv, y, biases[e], e))
    if not outputs:
        return columns.new_zeros(0, C)
    return torch.cat(outputs)


def run_gathered(x_pad: Tensor, tokens: Tokens, assignments: Assignments, experts: ExpertBank,
                 out_size: tuple[int, int]) -> Tensor:
    """Stacked-conv experts as one grouped matrix product over the receptive fields of routed positions,
    (B, C_out, H_out, W_out).

    Example:
        >>> from convmoe import MoEConv2d
        >>> from convmoe.dispatch import routed
        >>> block = MoEConv2d(4, 4, 3, padding=1, num_experts=2, tokens="pixel")
        >>> x_pad = block.geometry.pad(torch.randn(1, 4, 5, 5))
        >>> tokens = block.tokens.split(block.geometry.centre_sample(x_pad, (5, 5)))
        >>> run_gathered(x_pad, tokens, routed(block.router(tokens)), block.experts, (5, 5)).shape
        torch.Size([1, 4, 5, 5])
    """
    g, B = experts.geometry, x_pad.shape[0]
    channels_last = wants_channels_last(x_pad)
    layout = TileLayout.from_tokens(tokens)
    (th, tw), positions = layout.tile, layout.tile[0] * layout.tile[1]
    window = ((th - 1) * g.stride[0] + g.span[0], (tw - 1) * g.stride[1] + g.span[1])
    x_rows, input_size = channels_last_rows(x_pad.to(compute_dtype(x_pad)), layout.input_extent(g, window))
    part, counts = assignments.by_expert(experts.num_experts)
    origins = window_origins(layout, g, part.batch, part.token, input_size)  # (M,)
    # offsets of each tile position's receptive field, then of the taps within it
    position = grid_offsets(th, tw, g.stride[0], g.stride[1], input_size[1], x_pad.device)
    taps = grid_offsets(*g.kernel_size, g.dilation[0], g.dilation[1], input_size[1], x_pad.device)
    index = ((origins[:, None] + position[None, :]).flatten()[:, None] + taps[None, :])  # (M * th * tw, T)
    out = gathered_experts(experts, GatheredColumns(x_rows, index), counts * positions)  # (M * th * tw, C_out)
    tiles = combine_tiles(out.reshape(-1, th, tw, out.shape[-1]), part.weight,
                          part.batch * tokens.num_tokens + part.token, B * tokens.num_tokens)
    return layout.untile(tiles, channels_last)
