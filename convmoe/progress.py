"""A progress bar that reads its iterable exactly once.

``tqdm.auto.tqdm(loader)`` calls ``iter(loader)`` in its constructor and again when iterated
(tqdm#1598): a DataLoader then starts its workers twice and draws its shuffle order and worker
seeds twice, so wrapping a seeded loader in a bar changes the batches it yields. Here the bar only
counts; the loop iterates the iterable itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class ProgressBar(Generic[T]):
    """Iterate ``iterable`` once, advancing a tqdm bar (notebook-aware) after each item.

    Args:
        iterable: What to iterate; its ``len()``, when it has one, is the bar's total.
        description: The bar's label.
        enabled: Show the bar (off: the items only).
        total: The bar's total instead of ``len(iterable)`` (e.g. a batch limit).
        leave: Keep the finished bar on screen.

    Example:
        >>> bar = ProgressBar(range(3), description="steps", enabled=False)
        >>> list(bar), bar.count
        ([0, 1, 2], 3)
    """

    def __init__(self, iterable: Iterable[T], *, description: str, enabled: bool = True, total: int | None = None,
                 leave: bool = False) -> None:
        self.iterable = iterable
        self.count = 0
        self.bar = tqdm(total=_length(iterable) if total is None else total, desc=description, disable=not enabled,
                        leave=leave, dynamic_ncols=True)

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.iterable:
                yield item
                self.count += 1
                self.bar.update(1)
        finally:
            self.bar.close()

    def set_postfix(self, **values: Any) -> None:
        """Show ``key=value`` pairs after the bar (e.g. the running loss)."""
        self.bar.set_postfix(**values)

    def close(self) -> None:
        """Close the bar (iterating to the end closes it too)."""
        self.bar.close()


def progress_bar(iterable: Iterable[T], *, description: str, enabled: bool = True, total: int | None = None,
                 leave: bool = False) -> ProgressBar[T]:
    """A :class:`ProgressBar` over ``iterable``: each item once, in the iterable's own order.

    Example:
        >>> [batch for batch in progress_bar([1, 2], description="eval", enabled=False)]
        [1, 2]
    """
    return ProgressBar(iterable, description=description, enabled=enabled, total=total, leave=leave)


def _length(iterable: Iterable[Any]) -> int | None:
    """``len(iterable)``, or None for an iterable without one (a generator, an IterableDataset's loader)."""
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
