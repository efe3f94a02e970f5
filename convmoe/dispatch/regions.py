"""The regions path: each routed token's region (with its halo) cropped, one ``forward_segments`` call.

It gathers only what the routed (token, expert) pairs need, sorted by expert, straight from the
padded input in channels-last order, and adds the weighted outputs into a canvas of tiles that is
reshaped into the feature map (see :mod:`convmoe.dispatch.tiles`). It runs any bank: the dense
reference uses it (with every pair) for banks without ``forward_all`` or that see no halo.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from convmoe.dispatch.assignments import Assignments
from convmoe.dispatch.formats import wants_channels_last
from convmoe.dispatch.grouped import compute_dtype
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
from convmoe.experts.base import ExpertBank
from convmoe.types import Tokens


def _tile_shapes(tokens: Tokens, assignments: Assignments, experts: ExpertBank) -> list[tuple[tuple[int, int], Tensor | None]]:
    """Tile shapes to run and the assignments of each (None: all of them).

    Experts that see a halo (convs), so a token smaller than the tile just computes positions that are
    thrown away: one shape, the largest. Experts that see no halo treat each region as an image of
    their own, so regions of each shape run apart (a grid has at most four shapes).
    """
    if not experts.capabilities.sees_no_halo:
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


def run_regions(x_pad: Tensor, tokens: Tokens, assignments: Assignments, experts: ExpertBank,
                out_size: tuple[int, int]) -> Tensor:
    """Each assignment's expert on its token's window of ``x_pad``, weighted and summed, (B, C_out, H_out, W_out).

    Windows of routed tiles are stacked sorted by expert so that each expert runs once
    (``experts.forward_segments``) on all of its tiles. The window of a tile of output rows
    [r0, r0 + th) is padded-input rows [r0 * s, (r0 + th - 1) * s + span): the true neighbouring
    pixels, so a token sees exactly what the dense conv sees.
    """
    g, B, N = experts.geometry, x_pad.shape[0], tokens.num_tokens
    channels_last = wants_channels_last(x_pad)
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
        if tile != layout.tile:  # a halo-free region smaller than the largest: its tile's top-left corner
            out = F.pad(out, (0, 0, 0, layout.tile[1] - tile[1], 0, layout.tile[0] - tile[0]))
        tiles = combine_tiles(out, part.weight, part.batch * N + part.token, B * N)
        canvas = tiles if canvas is None else canvas + tiles
    if canvas is None:
        return x_pad.new_zeros(B, experts.out_channels, *out_size)
    return layout.untile(canvas, channels_last)

