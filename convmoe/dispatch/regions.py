"""Gather token regions (with their halo) from the padded input, run experts, scatter-add back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.dispatch.assignments import Assignments
from convmoe.types import Tokens


def _edges(edges: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    e = torch.tensor(edges, device=device)
    return e[:-1], e[1:] - e[:-1]


def run_regions(x_pad: Tensor, tokens: Tokens, assignments: Assignments, experts, out_size: tuple[int, int]) -> Tensor:
    """Each assignment's expert on its token's region of ``x_pad``, weighted and summed, (B, C_out, H_out, W_out).

    Regions of equal shape are batched together (a grid has at most four shapes); within a shape,
    rows are sorted by expert so each expert runs once on all of its regions. The window read for a
    region of output rows [r0, r1) is padded-input rows [r0 * s, (r1 - 1) * s + span): the true
    neighbouring pixels, so a token sees exactly what the dense conv sees.
    """
    g, device = experts.geometry, x_pad.device
    B = x_pad.shape[0]
    cols_per_row = len(tokens.col_edges) - 1
    row_start, row_size = _edges(tokens.row_edges, device)
    col_start, col_size = _edges(tokens.col_edges, device)
    heights = row_size[assignments.token // cols_per_row]
    widths = col_size[assignments.token % cols_per_row]

    x_cl = x_pad.permute(0, 2, 3, 1)  # (B, Hp, Wp, C): a region gather reads contiguous channels
    y = None
    for h in heights.unique().tolist():
        for w in widths.unique().tolist():
            keep = (heights == h) & (widths == w)
            if not keep.any():
                continue
            part, counts = assignments.subset(keep).sorted_by_expert(experts.num_experts)
            rows_out = row_start[part.token // cols_per_row]
            cols_out = col_start[part.token % cols_per_row]
            in_h, in_w = (h - 1) * g.stride[0] + g.span[0], (w - 1) * g.stride[1] + g.span[1]
            rows = (rows_out * g.stride[0])[:, None] + torch.arange(in_h, device=device)
            cols = (cols_out * g.stride[1])[:, None] + torch.arange(in_w, device=device)
            windows = x_cl[part.batch[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            out = experts.forward_segments(windows, counts)  # (M, C_out, h, w)
            out = out * part.weight.to(out.dtype)[:, None, None, None]
            if y is None:
                y = out.new_zeros(B, *out_size, out.shape[1])
            out_rows = rows_out[:, None] + torch.arange(h, device=device)
            out_cols = cols_out[:, None] + torch.arange(w, device=device)
            y = y.index_put((part.batch[:, None, None], out_rows[:, :, None], out_cols[:, None, :]),
                            out.permute(0, 2, 3, 1), accumulate=True)
    if y is None:
        return x_pad.new_zeros(B, experts.out_channels, *out_size)
    return y.permute(0, 3, 1, 2)


def run_pixels(x_pad: Tensor, assignments: Assignments, experts, out_size: tuple[int, int]) -> Tensor:
    """Per-pixel tokens: unfold receptive fields once, then one matrix product per expert, (B, C_out, H_out, W_out)."""
    g = experts.geometry
    B, L = x_pad.shape[0], out_size[0] * out_size[1]
    columns = F.unfold(x_pad, g.kernel_size, dilation=g.dilation, stride=g.stride)  # (B, C_in * kh * kw, L)
    part, counts = assignments.sorted_by_expert(experts.num_experts)
    gathered = columns.transpose(1, 2)[part.batch, part.token]  # (M, C_in * kh * kw)
    out = experts.forward_columns(gathered, counts)  # (M, C_out)
    out = out * part.weight.to(out.dtype)[:, None]
    y = out.new_zeros(B * L, out.shape[1]).index_add(0, part.batch * L + part.token, out)
    return y.reshape(B, *out_size, -1).permute(0, 3, 1, 2)
