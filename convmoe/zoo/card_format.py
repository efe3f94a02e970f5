"""How a model card shows numbers: metrics, milliseconds, column titles, tables (counts: :mod:`convmoe.formatting`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

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


def headline_metric(meta: Mapping[str, Any]) -> str:
    """The metric a card leads with: the held-out test split's when the runs measured it, else the monitor.

    Example:
        >>> headline_metric({"monitor": "val/top1", "metrics": {"val/top1": 90.1, "test/top1": 89.8}})
        'test/top1'
    """
    monitor = meta.get("monitor", "")
    test = "test/" + monitor.partition("/")[2]
    return test if test in (meta.get("metrics") or {}) else monitor


# The zoo's "about the same cost": active FLOPs and batch-1 latency against the dense twin at most these.
EQUAL_COST_FLOPS = 1.10
EQUAL_COST_LATENCY = 1.25


def comparison_sentence(meta: Mapping[str, Any]) -> str | None:
    """Whether the MoE variant beats its dense twin, and at what cost: the headline metric's difference of
    means against the larger of the two seed standard deviations (a win needs more than one seed on each
    side); None without a twin or without the metric in both.

    Example:
        >>> meta = {"monitor": "val/top1", "metrics": {"val/top1": 90.6}, "metrics_std": {"val/top1": 0.2},
        ...         "eval_split": "test", "seeds": [0, 1, 2], "active_flops": 101, "latency": {"ms": 11, "dense_twin_ms": 10},
        ...         "dense_twin": {"metrics": {"val/top1": 90.1}, "metrics_std": {"val/top1": 0.3}, "seeds": [0, 1, 2],
        ...                        "active_flops": 100}}
        >>> print(comparison_sentence(meta))
        **Against the dense twin:** +0.50 top-1 accuracy (%), test (3 and 3 seeds), more than the larger seed standard deviation (0.30): this variant wins, at 1.01x the twin's active FLOPs and 1.10x its batch-1 latency.
    """
    twin = meta.get("dense_twin") or {}
    name = headline_metric(meta)
    mine, theirs = (meta.get("metrics") or {}).get(name), (twin.get("metrics") or {}).get(name)
    if mine is None or theirs is None:
        return None
    difference = mine - theirs
    seeds = f"{len(meta.get('seeds') or [])} and {len(twin.get('seeds') or [])} seeds"
    text = (f"**Against the dense twin:** {'+' if difference >= 0 else '-'}{format_metric(name, abs(difference))} "
            f"{metric_label(name, meta.get('eval_split', 'val'))} ({seeds})")
    spreads = [(meta.get("metrics_std") or {}).get(name), (twin.get("metrics_std") or {}).get(name)]
    latency = meta.get("latency") or {}
    flop_ratio = meta["active_flops"] / twin["active_flops"] if meta.get("active_flops") and twin.get("active_flops") else None
    latency_ratio = latency["ms"] / latency["dense_twin_ms"] if latency.get("ms") and latency.get("dense_twin_ms") else None
    costs = [f"{flop_ratio:.2f}x the twin's active FLOPs" if flop_ratio else "",
             f"{latency_ratio:.2f}x its batch-1 latency" if latency_ratio else ""]
    cost = " and ".join(c for c in costs if c)
    at_cost = f", at {cost}" if cost else ""
    if (flop_ratio or 0) > EQUAL_COST_FLOPS or (latency_ratio or 0) > EQUAL_COST_LATENCY:
        at_cost += (f" (above the equal-cost limits of {EQUAL_COST_FLOPS:.2f}x FLOPs and {EQUAL_COST_LATENCY:.2f}x "
                    "latency)")
    if any(spread is None for spread in spreads):
        return text + f": one seed on a side has no spread to compare with, so no win is claimed{at_cost}."
    spread = max(spreads)
    if difference > spread:
        verdict = "more than the larger seed standard deviation ({}): this variant wins"
    elif difference < -spread:
        verdict = "more than the larger seed standard deviation ({}) behind: the dense twin is better"
    else:
        verdict = "within the larger seed standard deviation ({}): no win over the dense twin"
    return f"{text}, {verdict.format(format_metric(name, spread))}{at_cost}."


def format_ms(value: float | None) -> str:
    """Milliseconds with 3 significant digits (``n/a`` for None).

    Example:
        >>> format_ms(8.1234), format_ms(None)
        ('8.12 ms', 'n/a')
    """
    return "n/a" if value is None else f"{value:.3g} ms"


def metric_scale(name: str) -> float:
    """100 for the metrics given in percent (top-1, top-5), 1 for fractions (mIoU, pixel accuracy).

    Example:
        >>> metric_scale("test/top1"), metric_scale("val/miou")
        (100.0, 1.0)
    """
    return 100.0 if name.rsplit("/", 1)[-1] in ("top1", "top5") else 1.0


def selection_split(val_dataset: Mapping[str, Any] | None) -> str:
    """The name of the split a recipe's best epoch is chosen on: its ``val_dataset``'s ``split``, or ``held-out``
    when that dataset is a part set aside from another split (``part: held_out``), never trained on.

    Example:
        >>> selection_split({"split": "train", "hold_out": 5000, "part": "held_out"}), selection_split(None)
        ('held-out', 'val')
    """
    val_dataset = val_dataset or {}
    return "held-out" if val_dataset.get("part") == "held_out" else str(val_dataset.get("split", "val"))


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
