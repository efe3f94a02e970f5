"""The tokenizer protocol: how an output feature map is cut into routed regions."""

from __future__ import annotations

import torch
from torch import Tensor

from convmoe.caching import layout_cache
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
        row_edges, col_edges = (tuple(edges) for edges in self.edges(height, width))
        return Tokens(
            kind=self.spec,
            source=source,
            row_edges=row_edges,
            col_edges=col_edges,
            token_map=_token_map(row_edges, col_edges, source.device),
            group_over_batch=self.group_over_batch,
        )

    def __repr__(self) -> str:
        return self.spec


@layout_cache(maxsize=256)
def _token_map(row_edges: tuple[int, ...], col_edges: tuple[int, ...], device: torch.device) -> Tensor:
    """Token id of every output position, (H_out * W_out,) int64; one tensor per layout, shared read-only
    (a model calls every block with the same few sizes)."""
    with torch.inference_mode(False):  # a normal tensor even when first built under inference_mode
        rows = torch.bucketize(torch.arange(row_edges[-1]), torch.tensor(row_edges[1:-1]), right=True)
        cols = torch.bucketize(torch.arange(col_edges[-1]), torch.tensor(col_edges[1:-1]), right=True)
        return (rows[:, None] * (len(col_edges) - 1) + cols[None, :]).flatten().to(device)


def even_edges(size: int, parts: int) -> tuple[int, ...]:
    """Boundaries of ``parts`` near-equal pieces of ``size`` (sizes differ by at most one)."""
    return tuple((i * size) // parts for i in range(parts + 1))


def fixed_edges(size: int, step: int) -> tuple[int, ...]:
    """Boundaries of pieces of ``step``; the last piece keeps the remainder."""
    return (*range(0, size, step), size)
