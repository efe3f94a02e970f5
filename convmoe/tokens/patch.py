"""Fixed-size square patches."""

from __future__ import annotations

from convmoe.tokens.base import Tokenizer, fixed_edges


class PatchTokens(Tokenizer):
    """Patches of ``size x size`` output positions (``"patch:8"``).

    The last row and column of patches keep the remainder when the size does not divide the map,
    so nothing is cropped; a map smaller than one patch is a single token.

    Args:
        size: Patch side in output positions.

    Example:
        >>> import torch
        >>> PatchTokens(4).split(torch.randn(1, 2, 10, 8)).grid
        (3, 2)
    """

    def __init__(self, size: int = 8) -> None:
        if size < 1:
            raise ValueError(f"patch tokens need a size >= 1, got {size}.")
        self.size = size
        self.spec = f"patch:{size}"

    def edges(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return fixed_edges(height, self.size), fixed_edges(width, self.size)
