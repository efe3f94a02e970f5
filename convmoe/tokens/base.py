"""The tokenizer protocol: how an output feature map is cut into routed regions."""

from __future__ import annotations

import torch
from torch import Tensor

from convmoe.types import Tokens


class Tokenizer:
    """Base class: a subclass says where the region edges fall; ``split`` does the rest.

    Subclasses implement ``edges(height, width)`` returning row and column boundaries that start at
    0, end at the size and strictly increase, so every output position belongs to exactly one token.

    Example:
        >>> class Halves(Tokenizer):
        ...     spec = "halves"
        ...     def edges(self, height, width):
        ...         return (0, height // 2, height), (0, width)
        >>> Halves().split(torch.randn(1, 3, 4, 4)).num_tokens
        2
    """

    spec: str = "tokens"
    group_over_batch: bool = False

    def edges(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def split(self, source: Tensor) -> Tokens:
        """Partition ``source`` (B, C, H_out, W_out) into tokens."""
        height, width = source.shape[-2:]
        row_edges, col_edges = self.edges(height, width)
        rows = torch.bucketize(torch.arange(height), torch.tensor(row_edges[1:-1]), right=True)
        cols = torch.bucketize(torch.arange(width), torch.tensor(col_edges[1:-1]), right=True)
        token_map = (rows[:, None] * (len(col_edges) - 1) + cols[None, :]).flatten().to(source.device)
        return Tokens(
            kind=self.spec,
            source=source,
            row_edges=tuple(row_edges),
            col_edges=tuple(col_edges),
            token_map=token_map,
            group_over_batch=self.group_over_batch,
        )

    def __repr__(self) -> str:
        return self.spec


def even_edges(size: int, parts: int) -> tuple[int, ...]:
    """Boundaries of ``parts`` near-equal pieces of ``size`` (sizes differ by at most one)."""
    return tuple((i * size) // parts for i in range(parts + 1))


def fixed_edges(size: int, step: int) -> tuple[int, ...]:
    """Boundaries of pieces of ``step``; the last piece keeps the remainder."""
    return (*range(0, size, step), size)
