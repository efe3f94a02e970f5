"""The routing analysis of a model on a dataset: heatmaps, routing maps, scores, redundancy, one JSON report.

    report = analyze(model, val_loader, "analysis/", class_names=dataset.classes, images=first_images)
    print(report.table())                 # specialisation and balance, one row per MoE layer
    print(report.redundancy.table())      # layers ranked by how safely they fold back, with a recommendation

Files written to ``out_dir``: ``heatmap_<layer>.csv`` / ``.png`` per layer, ``heatmaps.png`` (all
layers), ``routing_map_<layer>.png`` (with ``images``) and ``report.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convmoe import __version__
from convmoe.analysis.balance import BalanceFigures, balance_figures
from convmoe.analysis.collect import RoutingCollection, collect_routing
from convmoe.analysis.cost import LayerCost, layer_cost
from convmoe.analysis.heatmap import class_order, plot_heatmap, plot_heatmap_grid, write_heatmap_csv
from convmoe.analysis.layers import moe_layers
from convmoe.analysis.plotting import safe_filename
from convmoe.analysis.redundancy import RedundancyReport, layer_redundancy
from convmoe.analysis.spatial import plot_routing_maps
from convmoe.analysis.specialization import SpecializationScore, specialization_score

REPORT_NAME = "report.json"
HEATMAP_GRID_NAME = "heatmaps.png"


@dataclass
class LayerAnalysis:
    """Everything measured about one MoE layer.

    Attributes:
        name: The layer's qualified name.
        num_experts: E.
        top_k: The block's top_k.
        tokens: Its tokenizer.
        specialization: Class/expert mutual information, normalised.
        balance: Utilisation, its entropy, imbalance, dead experts, dropped tokens, router entropy.
        cost: Active and dense MACs per image, parameters (None without output sizes).
        class_shares: Share of each class's tokens per expert, (C, E); rows sum to 1 (0 for unseen classes).
        class_tokens: Routed, labelled tokens per class, (C,).
        files: Written files by kind (``heatmap_png``, ``heatmap_csv``, ``routing_map_png``).

    Example:
        >>> layer = LayerAnalysis("a", 2, 1, "pixel", specialization_score(torch.eye(2)),
        ...                       balance_figures(torch.ones(2), 0, 2), None, torch.eye(2), torch.ones(2))
        >>> layer.classes(["cat", "dog"])[1]["dominant_expert"]
        1
    """

    name: str
    num_experts: int
    top_k: int
    tokens: str
    specialization: SpecializationScore
    balance: BalanceFigures
    cost: LayerCost | None
    class_shares: Tensor
    class_tokens: Tensor
    files: dict[str, str] = field(default_factory=dict)

    def classes(self, class_names: Sequence[str]) -> list[dict[str, Any]]:
        """Per class seen: its token count, dominant expert and that expert's share, in heatmap order."""
        out = []
        for c in class_order(self.class_shares):
            share, expert = self.class_shares[c].max(dim=0)
            out.append({"class": class_names[c], "tokens": round(float(self.class_tokens[c]), 6),
                        "dominant_expert": int(expert), "dominant_share": round(float(share), 6)})
        return out

    def as_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"num_experts": self.num_experts, "top_k": self.top_k, "tokens": self.tokens,
                "specialization": self.specialization.as_dict(), "balance": self.balance.as_dict(),
                "cost": self.cost.as_dict() if self.cost is not None else None,
                "classes": self.classes(class_names), "files": dict(self.files)}


@dataclass
class AnalysisReport:
    """The routing analysis of a model on a dataset.

    Attributes:
        task: ``"classification"`` or ``"segmentation"``.
        images: Images analysed.
        class_names: A name per class row.
        layers: Layer name -> :class:`LayerAnalysis`, in module order.
        redundancy: Fold-back ranking and recommendation, or None when not run.
        files: Written files by kind (``report_json``, ``heatmaps_png``).
        model: What was analysed (a path or Hub id), for the record.
        data: On what data.

    Example:
        >>> AnalysisReport("classification", 0, [], {}).as_dict()["layers"]
        {}
    """

    task: str
    images: int
    class_names: list[str]
    layers: dict[str, LayerAnalysis]
    redundancy: RedundancyReport | None = None
    files: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    data: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``model``, ``data``, ``task``, ``images``, ``class_names``, ``layers``,
        ``redundancy``, ``files`` (and the convmoe version)."""
        return {"convmoe_version": __version__, "model": self.model, "data": self.data, "task": self.task,
                "images": self.images, "class_names": list(self.class_names),
                "layers": {name: layer.as_dict(self.class_names) for name, layer in self.layers.items()},
                "redundancy": self.redundancy.as_dict() if self.redundancy is not None else None,
                "files": dict(self.files)}

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`as_dict` as indented JSON (NaN written as null)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(self.as_dict()), indent=2) + "\n", encoding="utf-8")
        return path

    def table(self) -> str:
        """Specialisation and balance, one row per MoE layer, as plain text."""
        header = (f"{'layer':<28} {'experts':>7} {'tokens':>9} {'spec.':>5} {'MI bits':>7} {'util.ent':>8} "
                  f"{'imbal.':>6} {'dead':>4} {'dropped':>7} {'router.ent':>10}")
        rows = [f"{self.task}, {self.images} images, {len(self.class_names)} classes", header, "-" * len(header)]
        for name, layer in self.layers.items():
            s, b = layer.specialization, layer.balance
            rows.append(f"{name:<28} {f'{layer.num_experts}/k{layer.top_k}':>7} {layer.tokens:>9} {s.score:>5.2f} "
                        f"{s.mutual_information_bits:>7.3f} {b.utilization_entropy:>8.3f} {b.imbalance:>6.2f} "
                        f"{len(b.dead_experts):>4} {b.dropped_rate:>7.1%} {b.router_entropy:>10.3f}")
        return "\n".join(rows)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):  # NaN is not valid JSON
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def summarize_collection(model: nn.Module, collection: RoutingCollection) -> dict[str, LayerAnalysis]:
    """Scores, balance and cost of every collected layer (no file written).

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2))
        >>> collection = collect_routing(model, [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))])
        >>> list(summarize_collection(model, collection))
        ['0']
    """
    blocks = dict(moe_layers(model))
    out = {}
    for name, layer in collection.layers.items():
        block = blocks.get(name)
        out[name] = LayerAnalysis(
            name=name, num_experts=layer.num_experts, top_k=layer.top_k, tokens=layer.tokens_spec,
            specialization=specialization_score(layer.class_expert.cpu()),
            balance=balance_figures(layer.load, layer.dropped, layer.tokens, layer.mean_router_entropy()),
            cost=layer_cost(block, layer) if block is not None else None,
            class_shares=layer.class_shares(), class_tokens=layer.class_tokens())
    return out


def fill_class_names(given: Sequence[str] | None, num_classes: int) -> list[str]:
    """The given class names, extended with class ids up to ``num_classes``.

    Example:
        >>> fill_class_names(["sky"], 3)
        ['sky', '1', '2']
    """
    names = [str(n) for n in given] if given is not None else []
    return names + [str(c) for c in range(len(names), num_classes)]


def write_heatmaps(report: AnalysisReport, out_dir: str | Path) -> dict[str, Path]:
    """Write every layer's heatmap (CSV and PNG) and the all-layer ``heatmaps.png``; records them in the report.

    Example:
        >>> import tempfile
        >>> layer = LayerAnalysis("a", 2, 1, "pixel", specialization_score(torch.eye(2)),
        ...                       balance_figures(torch.ones(2), 0, 2), None, torch.eye(2), torch.ones(2))
        >>> report = AnalysisReport("classification", 2, ["cat", "dog"], {"a": layer})
        >>> sorted(write_heatmaps(report, tempfile.mkdtemp()))
        ['a', 'grid']
    """
    out_dir = Path(out_dir)
    written = {}
    panels = []
    for name, layer in report.layers.items():
        stem = safe_filename(name)
        if not float(layer.class_tokens.sum()) > 0:
            continue
        names = fill_class_names(report.class_names, layer.class_shares.shape[0])[:layer.class_shares.shape[0]]
        order = class_order(layer.class_shares)
        title = f"{name}\nspecialisation {layer.specialization.score:.2f}"
        layer.files["heatmap_csv"] = str(write_heatmap_csv(out_dir / f"heatmap_{stem}.csv", layer.class_shares,
                                                           names, order))
        written[name] = plot_heatmap(out_dir / f"heatmap_{stem}.png", layer.class_shares, names, order, title,
                                     class_tokens=layer.class_tokens)
        layer.files["heatmap_png"] = str(written[name])
        panels.append((title, layer.class_shares, layer.class_tokens))
    if panels:
        rows = max(panel[1].shape[0] for panel in panels)
        written["grid"] = plot_heatmap_grid(out_dir / HEATMAP_GRID_NAME, panels, fill_class_names(report.class_names, rows))
        report.files["heatmaps_png"] = str(written["grid"])
    return written


def analyze(model: nn.Module, loader: Iterable, out_dir: str | Path | None = None, *,
            class_names: Sequence[str] | None = None, ignore_index: int | None = None, num_classes: int | None = None,
            images: Tensor | None = None, captions: Sequence[str] | None = None, redundancy: bool = True,
            redundancy_loader: Iterable | None = None, how: str = "average", tolerance: float = 0.01,
            device: str | torch.device | None = None, max_batches: int | None = None, progress: bool = False,
            model_name: str | None = None, data_name: str | None = None) -> AnalysisReport:
    """Analyse the routing of ``model`` on ``loader``: collect, score, plot, rank layers, write the report.

    Args:
        model: A model with MoE blocks.
        loader: Batches of dicts ``{"image", "label" | "mask"}`` or ``(image, target)`` pairs.
        out_dir: Where to write the files; None writes nothing (the report is still returned).
        class_names: A name per class (default: the class ids).
        ignore_index: Label of unlabelled pixels (segmentation).
        num_classes: Rows of the class matrices (default: the number of ``class_names``, else the highest
            label seen + 1).
        images: A few inputs (B, C, H, W) for the routing maps (None: no routing maps).
        captions: A caption per image of ``images``.
        redundancy: Fold each layer alone and rank them (one evaluation per layer, plus the joint check).
        redundancy_loader: Batches for the redundancy metric (default ``loader``).
        how: How experts are folded: ``"average"`` or ``"usage"``.
        tolerance: Largest relative metric loss for a layer to be recommended for folding.
        device: Device the inputs are moved to (default: the model's device); the model must be there.
        max_batches: Batches to use from each loader.
        progress: Show progress bars.
        model_name: Recorded in the report.
        data_name: Recorded in the report.

    Returns:
        The :class:`AnalysisReport` (also written to ``out_dir/report.json``).

    Example:
        >>> import tempfile
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2), nn.AdaptiveAvgPool2d(1),
        ...                       nn.Flatten(), nn.Linear(4, 2))
        >>> batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))]
        >>> report = analyze(model, batches, tempfile.mkdtemp(), class_names=["cat", "dog"])
        >>> sorted(report.files)
        ['heatmaps_png', 'report_json']
    """
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    collection = collect_routing(model, loader, device=device, ignore_index=ignore_index, num_classes=num_classes,
                                 class_names=list(class_names) if class_names is not None else None,
                                 max_batches=max_batches, progress=progress)
    layers = summarize_collection(model, collection)
    rows = max((layer.class_shares.shape[0] for layer in layers.values()), default=0)
    report = AnalysisReport(collection.task, collection.images, fill_class_names(class_names, rows), layers,
                            model=model_name, data=data_name)
    if out_dir is not None:
        write_heatmaps(report, out_dir)
        if images is not None:
            for name, path in plot_routing_maps(model, images, out_dir, captions=captions).items():
                if name in report.layers:
                    report.layers[name].files["routing_map_png"] = str(path)
    if redundancy:
        report.redundancy = layer_redundancy(model, redundancy_loader if redundancy_loader is not None else loader,
                                             collection=collection, how=how, tolerance=tolerance,
                                             task=collection.task, device=torch.device(device) if device else None,
                                             ignore_index=ignore_index, max_batches=max_batches)
    if out_dir is not None:
        path = Path(out_dir) / REPORT_NAME
        report.files["report_json"] = str(path)
        report.write_json(path)
    return report
