"""The two sparse compute paths over routed tiles: a conv per expert on stacked windows, or columns.

Both gather only what the routed (token, expert) pairs need, sorted by expert, straight from the
padded input in channels-last order, and add the weighted outputs into a canvas of tiles that is
reshaped into the feature map (see :mod:`convmoe.dispatch.tiles`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.dispatch.assignments import Assignments
from convmoe.dispatch.grouped import GatheredColumns, compute_dtype
from convmoe.dispatch.tiles import (
    TileLayout,
    channels_last_rows,
    combine_tiles,
    device_index,
    gather_rows,
    grid_offsets,
    sizes,
    window_origins,
)
from convmoe.types import Tokens


def _wants_channels_last(x_pad: Tensor) -> bool:
    return x_pad.dim() == 4 and x_pad.is_contiguous(memory_format=torch.channels_last) and not x_pad.is_contiguous()


def _tile_shapes(tokens: Tokens, assignments: Assignments, experts) -> list[tuple[tuple[int, int], Tensor | None]]:
    """Tile shapes to run and the assignments of each (None: all of them).

    Conv experts see a true halo, so a token smaller than the tile just computes positions that are
    thrown away: one shape, the largest. Patch-local experts treat each region as an image of its
    own, so regions of each shape run apart (a grid has at most four shapes).
    """
    if not experts.patch_local:
        return [(TileLayout.from_tokens(tokens).tile, None)]
    cols_per_row = len(tokens.col_edges) - 1
    row_sizes, col_sizes = sizes(tokens.row_edges), sizes(tokens.col_edges)
    device = assignments.token.device
    heights = device_index(tuple(row_sizes), device)[assignments.token // cols_per_row]
    widths = device_index(tuple(col_sizes), device)[assignments.token % cols_per_row]
    shapes = []
    for h in sorted(set(row_sizes)):
        for w in sorted(set(col_sizes)):
            shapes.append(((h, w), (heights == h) & (widths == w)))
    return shapes


def run_regions(x_pad: Tensor, tokens: Tokens, assignments: Assignments, experts, out_size: tuple[int, int]) -> Tensor:
    """Each assignment's expert on its token's window of ``x_pad``, weighted and summed, (B, C_out, H_out, W_out).

    Windows of routed tiles are stacked sorted by expert so that each expert runs once
    (``experts.forward_segments``) on all of its tiles. The window of a tile of output rows
    [r0, r0 + th) is padded-input rows [r0 * s, (r0 + th - 1) * s + span): the true neighbouring
    pixels, so a token sees exactly what the dense conv sees.
    """
    g, B, N = experts.geometry, x_pad.shape[0], tokens.num_tokens
    channels_last = _wants_channels_last(x_pad)
    x_pad = x_pad.to(compute_dtype(x_pad))
    layout = TileLayout.from_tokens(tokens)
    canvas = None
    for tile, keep in _tile_shapes(tokens, assignments, experts):
        part = assignments if keep is None else assignments.subset(keep)
        if part.token.numel() == 0:
            continue
        shape_layout = TileLayout.from_tokens(tokens, tile)
        window = ((tile[0] - 1) * g.stride[0] + g.span[0], (tile[1] - 1) * g.stride[1] + g.span[1])
        x_rows, input_size = channels_last_rows(x_pad, shape_layout.input_extent(g, window))
        part, counts = part.by_expert(experts.num_experts)
        origins = window_origins(shape_layout, g, part.batch, part.token, input_size)
        offsets = grid_offsets(*window, 1, 1, input_size[1], x_pad.device)
        windows = gather_rows(x_rows, origins, offsets).reshape(-1, *window, x_rows.shape[1])
        out = experts.forward_segments(windows.permute(0, 3, 1, 2), counts)  # (M, C_out, th, tw)
        out = out.permute(0, 2, 3, 1)
        if tile != layout.tile:  # a patch-local region smaller than the largest: its tile's top-left corner
            out = F.pad(out, (0, 0, 0, layout.tile[1] - tile[1], 0, layout.tile[0] - tile[0]))
        tiles = combine_tiles(out, part.weight, part.batch * N + part.token, B * N)
        canvas = tiles if canvas is None else canvas + tiles
    if canvas is None:
        return x_pad.new_zeros(B, experts.out_channels, *out_size)
    return layout.untile(canvas, channels_last)


def run_columns(x_pad: Tensor, tokens: Tokens, assignments: Assignments, experts, out_size: tuple[int, int]) -> Tensor:
    """Conv experts as one grouped matrix product over the receptive fields of routed positions,
    (B, C_out, H_out, W_out).

    Every output position of every routed tile becomes a row of its receptive field, (kh, kw, C_in),
    gathered from the channels-last input and sorted by expert; ``experts.forward_columns`` then
    runs all experts in one ``grouped_mm`` where available. Per-pixel tokens have 1x1 tiles, so
    the canvas is the feature map itself.
    """
    g, B = experts.geometry, x_pad.shape[0]
    channels_last = _wants_channels_last(x_pad)
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
    columns = GatheredColumns(x_rows, index)
    if not getattr(experts, "accepts_gathered_columns", False):
        columns = columns.materialize()  # (M * th * tw, T, C)
    out = experts.forward_columns(columns, counts * positions)  # (M * th * tw, C_out)
    tiles = combine_tiles(out.reshape(-1, th, tw, out.shape[-1]), part.weight,
                          part.batch * tokens.num_tokens + part.token, B * tokens.num_tokens)
    return layout.untile(tiles, channels_last)
