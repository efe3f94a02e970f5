"""How a model card shows numbers: metrics, milliseconds, column titles, tables (counts: :mod:`convmoe.formatting`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Hub metric types (evaluate ids) and display names of the engine's metrics.
METRIC_TYPES = {"miou": ("mean_iou", "mIoU"), "pixel_accuracy": ("accuracy", "pixel accuracy"),
                "top1": ("accuracy", "top-1 accuracy (%)"), "top5": ("accuracy", "top-5 accuracy (%)")}


def format_metric(name: str, value: float | None, spread: float | None = None) -> str:
    """A metric as the card shows it: percentages with 2 decimals, fractions with 4; ``± spread`` if given.

    Example:
        >>> format_metric("val/top1", 91.234, 0.5), format_metric("val/miou", 0.61234)
        ('91.23 ± 0.50', '0.6123')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    digits = 2 if name.rsplit("/", 1)[-1] in ("top1", "top5") else 4
    text = f"{value:.{digits}f}"
    return text if spread is None else f"{text} ± {spread:.{digits}f}"


def format_ms(value: float | None) -> str:
    """Milliseconds with 3 significant digits (``n/a`` for None).

    Example:
        >>> format_ms(8.1234), format_ms(None)
        ('8.12 ms', 'n/a')
    """
    return "n/a" if value is None else f"{value:.3g} ms"


def metric_label(name: str, eval_split: str) -> str:
    """A metric's column title: what it is and on which split (``val/*`` are on the config's val_dataset split).

    Example:
        >>> metric_label("val/top1", "test"), metric_label("val/miou", "val")
        ('top-1 accuracy (%), test', 'mIoU, val')
    """
    split, _, short = name.partition("/")
    return f"{METRIC_TYPES.get(short, (short, short))[1]}, {eval_split if split == 'val' else split}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines.

    Example:
        >>> markdown_table(["a"], [["1"]])
        ['| a |', '|---|', '| 1 |']
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def seeds_text(seeds: Sequence[int]) -> str:
    """``3 (0, 1, 2)``: how many seeds, and which."""
    return f"{len(seeds)} ({', '.join(map(str, seeds))})"


def mb(size: int) -> str:
    """Bytes as ``12.3 MB``."""
    return f"{size / 1e6:.1f} MB"
