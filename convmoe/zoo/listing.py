"""What a zoo holds, one summary per variant, read from the cards' ``convmoe:`` metadata: for ``convmoe zoo list``
and for the tables of ``zoo/README.md`` (:mod:`convmoe.zoo.table`), like ``timm.list_models(pretrained=True)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convmoe.zoo.card import split_front_matter
from convmoe.zoo.card_format import format_metric, headline_metric, metric_label
from convmoe.zoo.schema import CARD_NAME, is_dense_variant, validate_front_matter, variant_folders


@dataclass(frozen=True)
class VariantSummary:
    """One variant as its card sums it up.

    Attributes:
        model_id: The folder and Hub repo name.
        kind: ``"moe"`` or ``"dense"`` (a dense twin published as a variant).
        dataset: The dataset name.
        metric: The headline metric and split (``"mIoU, test"``).
        result: Its mean ± std over seeds.
        twin: The dense twin's result on the same metric (``""`` for a dense variant, ``"none"`` without a twin).
        flops_vs_twin: Active FLOPs over the twin's (``"1.08x"``; ``"n/a"`` unknown, ``""`` for a dense variant).
        latency_vs_twin: Batch-1 latency over the twin's, likewise.
        dense_model_id: The twin published as a variant, if any.
        twin_of: For a dense variant, the MoE variants it is the twin of.

    Example:
        >>> VariantSummary("m", "dense", "camvid", "mIoU, test", "0.50", "", "", "").kind
        'dense'
    """

    model_id: str
    kind: str
    dataset: str
    metric: str
    result: str
    twin: str
    flops_vs_twin: str
    latency_vs_twin: str
    dense_model_id: str | None = None
    twin_of: tuple[str, ...] = ()


def summarize(meta: Mapping[str, Any]) -> VariantSummary:
    """The summary of one card's ``convmoe:`` metadata.

    Example:
        >>> meta = {"model_id": "m", "dataset": "cifar10", "monitor": "val/top1", "metrics": {"test/top1": 88.25},
        ...         "metrics_std": {"test/top1": 0.35}, "active_flops": 101, "moe_blocks": {"conv_head": {}},
        ...         "dense_twin": {"metrics": {"test/top1": 88.26}, "active_flops": 100},
        ...         "latency": {"ms": 11.3, "dense_twin_ms": 10.0}}
        >>> s = summarize(meta)
        >>> s.result, s.twin, s.flops_vs_twin, s.latency_vs_twin
        ('88.25 ± 0.35', '88.26', '1.01x', '1.13x')
    """
    metric = headline_metric(meta)
    label = metric_label(metric, meta.get("eval_split", "val"))
    result = format_metric(metric, meta["metrics"].get(metric), (meta.get("metrics_std") or {}).get(metric))
    if is_dense_variant(meta):
        return VariantSummary(meta["model_id"], "dense", meta["dataset"], label, result, "", "", "",
                              twin_of=tuple(meta.get("moe_model_ids") or ()))
    twin = meta.get("dense_twin") or {}
    twin_text = (format_metric(metric, twin["metrics"].get(metric), (twin.get("metrics_std") or {}).get(metric))
                 if twin else "none")
    latency = meta.get("latency") or {}
    return VariantSummary(meta["model_id"], "moe", meta["dataset"], label, result, twin_text,
                          _ratio(meta.get("active_flops"), twin.get("active_flops")),
                          _ratio(latency.get("ms"), latency.get("dense_twin_ms")), meta.get("dense_model_id"))


def read_metadata(zoo_dir: str | Path) -> list[dict[str, Any]]:
    """The front matter of every variant card of ``zoo_dir`` that passes the schema, sorted by folder
    (``convmoe zoo check`` names the others).

    Example:
        >>> read_metadata("no/such/zoo")
        []
    """
    fronts = []
    for folder in variant_folders(zoo_dir):
        card = folder / CARD_NAME
        if card.is_file():
            try:
                front, _ = split_front_matter(card.read_text(encoding="utf-8"), str(card))
            except ValueError:
                continue  # `convmoe zoo check` reports it; the table lists the readable cards
            if not validate_front_matter(front, folder.name):
                fronts.append(front)
    return fronts


def list_variants(zoo_dir: str | Path = "zoo") -> list[VariantSummary]:
    """The variants of ``zoo_dir`` whose cards pass the schema, sorted by folder.

    Example:
        >>> list_variants("no/such/zoo")
        []
    """
    return [summarize(front["convmoe"]) for front in read_metadata(zoo_dir)]


def format_variants(summaries: Sequence[VariantSummary]) -> str:
    """A plain-text table of ``summaries``, one line each (``convmoe zoo list``).

    Example:
        >>> print(format_variants([VariantSummary("m", "dense", "camvid", "mIoU, test", "0.50", "", "", "")]))
        variant  kind   dataset  metric      result  dense twin  FLOPs vs twin  latency vs twin
        m        dense  camvid   mIoU, test  0.50
    """
    header = ("variant", "kind", "dataset", "metric", "result", "dense twin", "FLOPs vs twin", "latency vs twin")
    rows = [header, *((s.model_id, s.kind, s.dataset, s.metric, s.result, s.twin, s.flops_vs_twin,
                       s.latency_vs_twin) for s in summaries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "n/a"
