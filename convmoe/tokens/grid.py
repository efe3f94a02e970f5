"""A fixed grid of patches per image."""

from __future__ import annotations

from convmoe.tokens.base import Tokenizer, even_edges


class GridTokens(Tokenizer):
    """A fixed ``rows x cols`` grid of patches per image (``"grid:3x3"``).

    Sizes that the grid does not divide are split into near-equal patches (they differ by at most
    one pixel); nothing is cropped.

    Args:
        rows: Patches along the height.
        cols: Patches along the width.

    Raises:
        ValueError: At split time, when the feature map is smaller than the grid.

    Example:
        >>> import torch
        >>> GridTokens(3, 3).split(torch.randn(1, 4, 10, 9)).row_edges
        (0, 3, 6, 10)
    """

    def __init__(self, rows: int = 3, cols: int | None = None) -> None:
        cols = rows if cols is None else cols
        if rows < 1 or cols < 1:
            raise ValueError(f"grid tokens need at least 1x1 patches, got {rows}x{cols}.")
        self.rows, self.cols = rows, cols
        self.spec = f"grid:{rows}x{cols}"

    def edges(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if height < self.rows or width < self.cols:
            raise ValueError(f"tokens {self.spec!r} needs a feature map of at least {self.rows}x{self.cols}, "
                             f"got {height}x{width}; use a smaller grid or 'pixel'.")
        return even_edges(height, self.rows), even_edges(width, self.cols)
