"""Per-pixel tokens: every output position is routed on its own."""

from __future__ import annotations

from convmoe.tokens.base import Tokenizer


class PixelTokens(Tokenizer):
    """Every output position is a token (``"pixel"``), as in per-pixel MoE decoders.

    Example:
        >>> import torch
        >>> PixelTokens().split(torch.randn(2, 3, 5, 7)).num_tokens
        35
    """

    spec = "pixel"

    def edges(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(range(height + 1)), tuple(range(width + 1))
