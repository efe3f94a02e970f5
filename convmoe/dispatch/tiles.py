"""Tokens as equal tiles: gather each routed tile's input window from a channels-last map, untile outputs.

Every token is a rectangle of output positions. Laid out as tiles of one size ``(th, tw)`` (the
largest token; smaller tokens compute a few extra positions that are thrown away), routed tiles
stack into one batch, and their outputs form a canvas ``(B, rows, th, cols, tw, C)`` that is a
reshape away from the feature map. The input window behind a tile is read straight from the
padded input in channels-last order, so the gather copies whole channel vectors (C contiguous
values) and its backward is a row ``index_add``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.caching import layout_cache
from convmoe.geometry import ConvGeometry
from convmoe.types import Tokens


@layout_cache(maxsize=256)
def device_index(values: tuple[int, ...], device: torch.device) -> Tensor:
    """``values`` as an int64 tensor on ``device``, made once: a fresh host-to-device copy on every
    forward would make the host wait for the device. Treat the result as read-only.

    Example:
        >>> device_index((0, 3, 5), torch.device("cpu"))
        tensor([0, 3, 5])
    """
    return torch.tensor(values, dtype=torch.int64, device=device)


def sizes(edges: tuple[int, ...]) -> list[int]:
    """Sizes of the pieces between consecutive edges.

    Example:
        >>> sizes((0, 3, 5))
        [3, 2]
    """
    return [b - a for a, b in itertools.pairwise(edges)]


@dataclass(frozen=True)
class TileLayout:
    """The tokens of a feature map as tiles of ``tile`` output positions.

    Attributes:
        tile: Output positions per tile, (th, tw).
        row_starts: First output row of each row of tokens.
        col_starts: First output column of each column of tokens.
        out_size: The feature map's (H_out, W_out).

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> tokens = create_tokens("grid:2x2").split(torch.randn(1, 3, 5, 4))
        >>> layout = TileLayout.from_tokens(tokens)
        >>> layout.tile, layout.uniform
        ((3, 2), False)
    """

    tile: tuple[int, int]
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]
    out_size: tuple[int, int]

    @classmethod
    def from_tokens(cls, tokens: Tokens, tile: tuple[int, int] | None = None) -> TileLayout:
        """Tiles of ``tile`` positions (default: the largest token) at the tokens' origins."""
        rows, cols = tokens.row_edges, tokens.col_edges
        if tile is None:
            tile = (max(sizes(rows)), max(sizes(cols)))
        return cls(tile, rows[:-1], cols[:-1], (rows[-1], cols[-1]))

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.row_starts), len(self.col_starts)

    @property
    def uniform(self) -> bool:
        """True when the tiles cover the map exactly (no position computed twice)."""
        (R, C), (th, tw) = self.grid, self.tile
        return R * th == self.out_size[0] and C * tw == self.out_size[1]

    def _canvas_positions(self, axis: int) -> tuple[int, ...]:
        starts, step, size = (self.row_starts, self.col_starts)[axis], self.tile[axis], self.out_size[axis]
        return tuple(t * step + p - start for t, (start, stop) in enumerate(itertools.pairwise((*starts, size)))
                     for p in range(start, stop))

    def canvas_index(self, axis: int, device: torch.device) -> Tensor:
        """Index of every output row (axis 0) or column (axis 1) in the tiled canvas, (H_out,) or (W_out,)."""
        return device_index(self._canvas_positions(axis), device)

    def canvas_rows(self, device: torch.device) -> Tensor:
        """Row of every output position (row-major) in one image's canvas of tiles seen as (N * th * tw, C) rows.

        Example:
            >>> from convmoe.tokens import create_tokens
            >>> layout = TileLayout.from_tokens(create_tokens("grid:2x2").split(torch.randn(1, 1, 3, 2)))
            >>> layout.tile, layout.row_starts  # token rows of 1 and 2 output rows, tiles of 2 x 1
            ((2, 1), (0, 1))
            >>> layout.canvas_rows(torch.device("cpu")).tolist()  # canvas rows 1 and 3 are unused
            [0, 2, 4, 6, 5, 7]
        """
        return _canvas_rows(self, device)

    def input_extent(self, geometry: ConvGeometry, window: tuple[int, int]) -> tuple[int, int]:
        """Padded-input (rows, cols) that every tile's window of ``window`` input positions fits in."""
        return tuple(starts[-1] * stride + size for starts, stride, size
                     in zip((self.row_starts, self.col_starts), geometry.stride, window, strict=True))

    def untile(self, canvas: Tensor, channels_last: bool) -> Tensor:
        """Canvas (B * N, th, tw, C) of tile outputs -> feature map (B, C, H_out, W_out).

        ``channels_last`` picks the memory format of the result (the values are the same).
        """
        (R, Cn), (th, tw) = self.grid, self.tile
        C = canvas.shape[-1]
        if not self.uniform:  # one gather of whole channel rows, straight into the map (channels-last)
            per_image = R * Cn * th * tw
            rows = self.canvas_rows(canvas.device)
            images = canvas.shape[0] // (R * Cn)
            index = (torch.arange(images, device=canvas.device)[:, None] * per_image + rows[None, :]).flatten()
            y = canvas.reshape(-1, C).index_select(0, index).reshape(images, *self.out_size, C).permute(0, 3, 1, 2)
            return y if channels_last else y.contiguous()
        canvas = canvas.reshape(-1, R, Cn, th, tw, C)
        if channels_last:
            y = canvas.permute(0, 1, 3, 2, 4, 5).reshape(-1, R * th, Cn * tw, C)
            if not self.uniform:
                y = y.index_select(1, self.canvas_index(0, y.device)).index_select(2, self.canvas_index(1, y.device))
            return y.permute(0, 3, 1, 2)
        y = canvas.permute(0, 5, 1, 3, 2, 4).reshape(-1, C, R * th, Cn * tw)
        if not self.uniform:
            y = y.index_select(2, self.canvas_index(0, y.device)).index_select(3, self.canvas_index(1, y.device))
        return y.contiguous()


@layout_cache(maxsize=64)
def _canvas_rows(layout: TileLayout, device: torch.device) -> Tensor:
    (_, columns), (th, tw) = layout.grid, layout.tile
    rows, cols = layout._canvas_positions(0), layout._canvas_positions(1)
    index = [((r // th) * columns + c // tw) * th * tw + (r % th) * tw + c % tw for r in rows for c in cols]
    return torch.tensor(index, dtype=torch.int64, device=device)


def channels_last_rows(x_pad: Tensor, extent: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """The padded input as rows of channels, (B * Hq * Wq, C), zero-extended at the bottom and right
    to at least ``extent``; returns the rows and (Hq, Wq)."""
    C, H, W = x_pad.shape[1:]
    x_cl = x_pad.permute(0, 2, 3, 1)
    extra_h, extra_w = max(0, extent[0] - H), max(0, extent[1] - W)
    if extra_h or extra_w:
        x_cl = F.pad(x_cl, (0, 0, 0, extra_w, 0, extra_h))
    return x_cl.reshape(-1, C), (H + extra_h, W + extra_w)


def window_origins(layout: TileLayout, geometry: ConvGeometry, batch: Tensor, token: Tensor,
                   input_size: tuple[int, int]) -> Tensor:
    """Flat row (in ``channels_last_rows``) of the top-left input position of each tile's window, (M,)."""
    Hq, Wq = input_size
    cols = len(layout.col_starts)
    row_starts = device_index(tuple(start * geometry.stride[0] for start in layout.row_starts), token.device)
    col_starts = device_index(tuple(start * geometry.stride[1] for start in layout.col_starts), token.device)
    return batch * (Hq * Wq) + row_starts[token // cols] * Wq + col_starts[token % cols]


def grid_offsets(rows: int, cols: int, row_step: int, col_step: int, row_pitch: int, device: torch.device) -> Tensor:
    """Flat offsets of a ``rows x cols`` grid of positions ``row_step``/``col_step`` apart, (rows * cols,)."""
    r = torch.arange(rows, device=device) * (row_step * row_pitch)
    c = torch.arange(cols, device=device) * col_step
    return (r[:, None] + c[None, :]).flatten()


def gather_rows(x_rows: Tensor, origins: Tensor, offsets: Tensor) -> Tensor:
    """``x_rows[origins[m] + offsets[j]]`` for every m and j, (M, J, C); the backward is a row ``index_add``."""
    index = (origins[:, None] + offsets[None, :]).flatten()
    return x_rows.index_select(0, index).reshape(origins.shape[0], offsets.shape[0], x_rows.shape[1])


def combine_tiles(outputs: Tensor, weight: Tensor, destination: Tensor, num_tiles: int) -> Tensor:
    """Weighted sum of tile outputs (M, th, tw, C) into a canvas (num_tiles, th, tw, C) at ``destination`` (M,)."""
    # Accumulate in float32 for half types: CPU index_add in bfloat16/float16 is ~100x slower, and less exact.
    accumulate = torch.float32 if outputs.dtype in (torch.bfloat16, torch.float16) else outputs.dtype
    weighted = outputs.to(accumulate) * weight.to(accumulate)[:, None, None, None]
    canvas = torch.zeros(num_tiles, *outputs.shape[1:], dtype=accumulate, device=outputs.device)
    return canvas.index_add_(0, destination, weighted).to(outputs.dtype)  # in place: the canvas is new
