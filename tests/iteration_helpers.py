"""A test iterable that counts how often it is iterated."""

from __future__ import annotations

from collections.abc import Iterator


class CountingIterable:
    """A sized iterable that counts how often it is iterated."""

    def __init__(self, items: list) -> None:
        self.items = items
        self.iterations = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator:
        self.iterations += 1
        return iter(self.items)
