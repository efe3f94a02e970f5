"""Layer redundancy: what each MoE layer is worth, measured by folding it alone back into a dense conv.

For every MoE layer the validation metric is measured with that layer folded (``convmoe.unpatch``
of the layer alone, :func:`~convmoe.analysis.folding.folded_layer`), next to the compute folding
saves. Layers whose metric barely moves are redundant: fold them back and keep the ones that earn
their cost. The recommended set is then checked folded together, since small losses add up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from convmoe.analysis.collect import RoutingCollection
from convmoe.analysis.cost import layer_cost
from convmoe.analysis.folding import folded_layer
from convmoe.analysis.layers import moe_layers
from convmoe.analysis.specialization import specialization_score
from convmoe.engine.checkpoint import unwrap_model
from convmoe.engine.evaluate import run_evaluation
from convmoe.formatting import format_count

FOLD, KEEP = "fold", "keep"


@dataclass(frozen=True)
class LayerRedundancy:
    """The effect of folding one MoE layer back into a dense conv.

    Attributes:
        name: The layer.
        folded_metric: The metric with this layer folded (None when it cannot be folded).
        change: ``folded_metric - baseline`` (negative: folding hurts).
        macs_saved: MACs per image folding saves (see :class:`~convmoe.analysis.cost.LayerCost`), or None.
        params_saved: Parameters folding removes, or None.
        specialization: The layer's specialisation score, or None without a routing collection.
        recommendation: ``"fold"`` (the metric stays within tolerance) or ``"keep"``.
        reason: Why, in words.

    Example:
        >>> LayerRedundancy("a", 70.0, -0.1, 1e6, 1000, 0.02, "fold", "within tolerance").change
        -0.1
    """

    name: str
    folded_metric: float | None
    change: float | None
    macs_saved: float | None
    params_saved: int | None
    specialization: float | None
    recommendation: str
    reason: str


@dataclass(frozen=True)
class RedundancyReport:
    """Every MoE layer ranked by how safely it folds back, with a recommendation.

    Attributes:
        metric_name: The metric (higher is better), e.g. ``"top1"`` or ``"miou"``.
        baseline: The metric of the model as it is.
        tolerance: Largest accepted relative loss, as a fraction of the baseline.
        how: How experts were folded (``"average"`` or ``"usage"``).
        layers: One entry per layer, safest to fold first.
        fold_together: The layers recommended to fold, the largest prefix of the ranking whose joint
            fold stays within tolerance.
        fold_together_metric: The metric with all of ``fold_together`` folded at once (None when fewer
            than two).

    Example:
        >>> report = RedundancyReport("top1", 70.0, 0.01, "average", [])
        >>> report.recommendation()
        'No MoE layer to fold.'
    """

    metric_name: str
    baseline: float
    tolerance: float
    how: str
    layers: list[LayerRedundancy]
    fold_together: list[str] = field(default_factory=list)
    fold_together_metric: float | None = None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict, with the recommendation text."""
        out = asdict(self)
        out["recommendation"] = self.recommendation()
        return out

    def recommendation(self) -> str:
        """One paragraph: which layers to fold back, what it costs in metric and saves in compute, which to keep."""
        if not self.layers:
            return "No MoE layer to fold."
        by_name = {layer.name: layer for layer in self.layers}
        keep = [layer.name for layer in self.layers if layer.name not in self.fold_together]
        if not self.fold_together:
            return (f"Keep every MoE layer: folding any one of them alone changes {self.metric_name} by more than "
                    f"{self.tolerance:.1%} of {self.baseline:.4g} (or it cannot be folded).")
        saved = sum(by_name[name].macs_saved or 0.0 for name in self.fold_together)
        metric = self.fold_together_metric
        if metric is None:
            metric = by_name[self.fold_together[0]].folded_metric
        text = (f"Fold back {', '.join(self.fold_together)}: {self.metric_name} {self.baseline:.4g} -> {metric:.4g} "
                f"with {'them' if len(self.fold_together) > 1 else 'it'} folded, saving {format_count(saved)} MACs per image.")
        if keep:
            text += f" Keep {', '.join(keep)} (folding costs more than {self.tolerance:.1%} of the metric)."
        return text

    def table(self) -> str:
        """A plain-text table, safest layer to fold first."""
        header = (f"{'rank':>4}  {'layer':<28} {'spec.':>5} {self.metric_name + ' folded':>13} {'change':>8} "
                  f"{'MACs saved/img':>14} {'params saved':>12}  recommendation")
        intro = (f"baseline {self.metric_name} = {self.baseline:.4g}; tolerance {self.tolerance:.1%}; experts "
                 f"folded by {self.how}")
        rows = [intro, header, "-" * len(header)]
        for rank, layer in enumerate(self.layers, start=1):
            spec = f"{layer.specialization:.2f}" if layer.specialization is not None else "-"
            folded = f"{layer.folded_metric:.4g}" if layer.folded_metric is not None else "-"
            change = f"{layer.change:+.4g}" if layer.change is not None else "-"
            macs = format_count(layer.macs_saved) if layer.macs_saved is not None else "-"
            params = format_count(layer.params_saved) if layer.params_saved is not None else "-"
            rows.append(f"{rank:>4}  {layer.name:<28} {spec:>5} {folded:>13} {change:>8} {macs:>14} {params:>12}  "
                        f"{layer.recommendation}: {layer.reason}")
        rows.append("")
        rows.append(self.recommendation())
        return "\n".join(rows)


def default_metric(loader: Iterable, *, task: str = "auto", device: torch.device | None = None,
                   ignore_index: int | None = None, max_batches: int | None = None) -> tuple[str, Callable[[nn.Module], float]]:
    """The engine's validation metric as ``(name, metric(model) -> float)``: top-1 accuracy (%) or mIoU.

    Example:
        >>> batches = [(torch.randn(4, 12), torch.tensor([0, 1, 2, 0]))]
        >>> name, metric = default_metric(batches, task="classification")
        >>> name, 0.0 <= metric(nn.Linear(12, 3)) <= 100.0
        ('top1', True)
    """
    name = {"classification": "top1", "segmentation": "miou"}.get(task)

    def metric(model: nn.Module) -> float:
        run_on = device or next((p.device for p in model.parameters()), torch.device("cpu"))
        results = run_evaluation(model, loader, run_on, task=task, ignore_index=ignore_index, max_batches=max_batches)
        key = name or ("top1" if "top1" in results else "miou")
        return float(results[key])

    return name or "metric", metric


def layer_redundancy(model: nn.Module, loader: Iterable | None = None, *,
                     metric: Callable[[nn.Module], float] | None = None, metric_name: str | None = None,
                     collection: RoutingCollection | None = None, how: str = "average", tolerance: float = 0.01,
                     task: str = "auto", device: torch.device | None = None, ignore_index: int | None = None,
                     max_batches: int | None = None) -> RedundancyReport:
    """Fold each MoE layer alone, measure the metric, rank the layers and recommend which to fold back.

    The model is restored afterwards: the same block objects are put back, so its state dict,
    module types and outputs are unchanged (its training mode too).

    Args:
        model: A model with MoE blocks (conv experts; others are reported as not foldable).
        loader: Validation batches for the default metric (top-1 % or mIoU via ``convmoe.engine``).
        metric: ``metric(model) -> float``, higher is better; replaces the default metric.
        metric_name: Its name in reports.
        collection: Routing over the data (:func:`~convmoe.analysis.collect.collect_routing`): adds
            specialisation and compute saved, and the usage for ``how="usage"``.
        how: Fold experts by ``"average"`` or ``"usage"``.
        tolerance: Largest relative metric loss for ``"fold"`` (0.01: 1% of the baseline).
        task: ``"classification"``, ``"segmentation"`` or ``"auto"`` (default metric).
        device: Where the default metric runs.
        ignore_index: Unscored label (segmentation, default metric).
        max_batches: Batches the default metric uses.

    Returns:
        A :class:`RedundancyReport`, safest layer to fold first.

    Raises:
        ValueError: Neither ``loader`` nor ``metric``; no MoE block; a negative tolerance.

    Example:
        >>> from convmoe.patch import patch
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> model = patch(model, targets="0")
        >>> batches = [(torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 0, 1]))]
        >>> report = layer_redundancy(model, batches)
        >>> [layer.recommendation for layer in report.layers]   # upcycled, untrained: folding changes nothing
        ['fold']
    """
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0 (a fraction of the baseline metric, e.g. 0.01).")
    if metric is None:
        if loader is None:
            raise ValueError("layer_redundancy needs a validation loader or a metric(model) -> float.")
        if task == "auto" and collection is not None:
            task = collection.task
        default_name, metric = default_metric(loader, task=task, device=device, ignore_index=ignore_index,
                                              max_batches=max_batches)
        metric_name = metric_name or default_name
    metric_name = metric_name or "metric"
    root = unwrap_model(model)
    blocks = dict(moe_layers(root))
    if not blocks:
        raise ValueError("the model has no MoE block; there is no layer to fold.")
    was_training = root.training
    try:
        baseline = float(metric(model))
        allowed = tolerance * abs(baseline)
        entries = []
        for name, block in blocks.items():
            layer = collection.layers.get(name) if collection is not None else None
            usage = layer.usage if layer is not None and how == "usage" else None
            spec = specialization_score(layer.class_expert).score if layer is not None and layer.num_classes else None
            cost = layer_cost(block, layer) if layer is not None else None
            macs = cost.macs_saved if cost is not None else None
            params = sum(p.numel() for p in block.parameters())
            try:
                with folded_layer(root, name, how, usage) as dense:
                    params = params - sum(p.numel() for p in dense.parameters())
                    folded = float(metric(model))
            except TypeError as error:
                entries.append(LayerRedundancy(name, None, None, macs, None, spec, KEEP, f"cannot be folded ({error})"))
                continue
            change = folded - baseline
            ok = not math.isnan(change) and -change <= allowed
            reason = (f"{metric_name} {change:+.4g}, within {tolerance:.1%}" if ok
                      else f"{metric_name} {change:+.4g}, beyond {tolerance:.1%}")
            entries.append(LayerRedundancy(name, folded, change, macs, params, spec, FOLD if ok else KEEP, reason))
        entries.sort(key=_rank_key)
        together, together_metric = _fold_together(model, root, entries, metric, baseline, allowed, how, collection)
        entries = [dataclasses.replace(entry, recommendation=KEEP, reason=entry.reason + "; but not together with the "
                                       "layers ranked above")
                   if entry.recommendation == FOLD and entry.name not in together else entry for entry in entries]
    finally:
        root.train(was_training)
    return RedundancyReport(metric_name, baseline, tolerance, how, entries, together, together_metric)


def _rank_key(entry: LayerRedundancy) -> tuple[float, float, str]:
    # Foldable layers first, the smallest loss first, then the largest compute saving.
    loss = -entry.change if entry.change is not None and not math.isnan(entry.change) else math.inf
    return (loss, -(entry.macs_saved or 0.0), entry.name)


def _fold_together(model: nn.Module, root: nn.Module, entries: list[LayerRedundancy],
                   metric: Callable[[nn.Module], float], baseline: float, allowed: float, how: str,
                   collection: RoutingCollection | None) -> tuple[list[str], float | None]:
    """The largest prefix of the ranked fold candidates whose joint fold stays within tolerance."""
    candidates = [entry for entry in entries if entry.recommendation == FOLD]
    if len(candidates) < 2:
        return [entry.name for entry in candidates], None
    chosen, chosen_metric = [candidates[0].name], None
    for entry in candidates[1:]:
        names = [*chosen, entry.name]
        with ExitStack() as stack:
            for name in names:
                layer = collection.layers.get(name) if collection is not None else None
                usage = layer.usage if layer is not None and how == "usage" else None
                stack.enter_context(folded_layer(root, name, how, usage))
            value = float(metric(model))
        if math.isnan(value) or baseline - value > allowed:
            break
        chosen, chosen_metric = names, value
    return chosen, chosen_metric
