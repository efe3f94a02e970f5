"""One token per image (CondConv-like per-sample routing)."""

from __future__ import annotations

from convmoe.tokens.base import Tokenizer


class ImageTokens(Tokenizer):
    """The whole image is one token (``"image"``); capacity, if any, is shared by the batch.

    Example:
        >>> import torch
        >>> ImageTokens().split(torch.randn(3, 2, 5, 5)).num_tokens
        1
    """

    spec = "image"
    group_over_batch = True

    def edges(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (0, height), (0, width)
