"""Training-time tracking: specialisation and balance of every MoE layer per epoch, and their curves.

A training loop (the engine, or your own) calls three methods::

    tracker = RoutingTracker(ignore_index=11).attach(model)   # hooks record the layers' output sizes
    for epoch in range(epochs):
        for images, target in loader:
            loss = criterion(model(images), target) + convmoe.aux_loss(model)
            tracker.update(model, target)                     # adds to a few sums per layer
            ...
        row = tracker.epoch_end(epoch)                        # {"routing/<layer>/specialization": ..., ...}
    tracker.plot("routing_curves.png"); tracker.save("routing_history.json")
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.analysis.balance import balance_figures
from convmoe.analysis.collect import RoutingCollector
from convmoe.analysis.plotting import require_matplotlib, save_figure
from convmoe.analysis.specialization import specialization_score

#: The per-layer statistics an epoch row holds, in plot order.
TRACKED = ("specialization", "mutual_information_bits", "utilization_entropy", "imbalance", "dead_experts",
           "dropped_rate", "router_entropy")


class RoutingTracker:
    """Sums routing over an epoch's training batches and turns it into per-layer statistics per epoch.

    Each epoch row maps ``"routing/<layer>/<statistic>"`` to a float, for ``statistic`` in
    :data:`TRACKED`: specialisation (normalised class/expert mutual information), its raw value in
    bits, utilisation entropy, imbalance, number of dead experts, dropped-token rate and router
    entropy; ready for a CSV or TensorBoard logger. In training the routing includes router noise and
    expert dropout, as the model really ran.

    Args:
        ignore_index: Label of unlabelled pixels (segmentation), skipped.
        num_classes: Number of classes; needed with ``reduce`` so that every process sums matrices of one size.
        prefix: Key prefix of the epoch rows.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2))
        >>> tracker = RoutingTracker().attach(model)
        >>> _ = model(torch.randn(2, 3, 8, 8))
        >>> tracker.update(model, torch.tensor([0, 1]))
        >>> row = tracker.epoch_end(0)
        >>> sorted(row)[:2]
        ['routing/0/dead_experts', 'routing/0/dropped_rate']
    """

    def __init__(self, ignore_index: int | None = None, num_classes: int | None = None,
                 prefix: str = "routing/") -> None:
        self.collector = RoutingCollector(ignore_index=ignore_index, num_classes=num_classes)
        self.num_classes = num_classes
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []

    def attach(self, model: nn.Module) -> RoutingTracker:
        """Hook the model's MoE layers to record their output sizes (needed for label maps); returns ``self``."""
        self.collector.attach(model)
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        self.collector.detach()

    def update(self, model: nn.Module, labels: Tensor) -> None:
        """Add the routing of the model's last forward pass with that batch's labels (B,) or label maps (B, H, W)."""
        self.collector.update(model, labels)

    def epoch_end(self, epoch: int | None = None,
                  reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Statistics of the epoch's batches, appended to :attr:`history`; the sums are reset.

        Args:
            epoch: The epoch number recorded with the row (default: the row's index).
            reduce: Sums a tensor over processes (e.g. ``convmoe.engine.processes.all_reduce_sum``)
                under distributed training; every process must call ``epoch_end``.

        Returns:
            ``{"routing/<layer>/<statistic>": value}``.

        Raises:
            ValueError: ``reduce`` without ``num_classes``.
        """
        if reduce is not None and self.num_classes is None:
            raise ValueError("RoutingTracker(num_classes=...) is needed with reduce=: every process must sum class "
                             "matrices of the same size.")
        row: dict[str, float] = {}
        layers: dict[str, dict[str, float]] = {}
        for name, layer in self.collector.layers.items():
            class_expert, load = layer.class_expert, layer.load
            counters = torch.tensor([layer.tokens, layer.dropped, layer.router_entropy_sum], dtype=torch.float64)
            if reduce is not None:
                class_expert, load = reduce(class_expert.clone()), reduce(load.clone())
                counters = reduce(counters.to(load.device)).cpu()
            tokens, dropped, entropy_sum = (float(v) for v in counters)
            score = specialization_score(class_expert.cpu())
            balance = balance_figures(load, dropped, tokens, entropy_sum / tokens if tokens else float("nan"))
            stats = {"specialization": score.score, "mutual_information_bits": score.mutual_information_bits,
                     "utilization_entropy": balance.utilization_entropy, "imbalance": balance.imbalance,
                     "dead_experts": float(len(balance.dead_experts)), "dropped_rate": balance.dropped_rate,
                     "router_entropy": balance.router_entropy}
            layers[name] = stats
            row.update({f"{self.prefix}{name}/{key}": value for key, value in stats.items()})
        self.history.append({"epoch": len(self.history) if epoch is None else epoch, "layers": layers})
        self.collector.reset()
        return row

    def save(self, path: str | Path) -> Path:
        """Write :attr:`history` as JSON: ``[{"epoch": 0, "layers": {name: {statistic: value}}}, ...]``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.history, indent=2) + "\n", encoding="utf-8")
        return path

    def plot(self, path: str | Path, statistics: Sequence[str] = ("specialization", "utilization_entropy",
                                                                  "imbalance", "dropped_rate")) -> Path:
        """Save the curves of :attr:`history` as a PNG (see :func:`plot_tracking`)."""
        return plot_tracking(self.history, path, statistics)


def load_history(path: str | Path) -> list[dict[str, Any]]:
    """Read a history written by :meth:`RoutingTracker.save`.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "h.json")
        >>> _ = open(path, "w").write('[{"epoch": 0, "layers": {}}]')
        >>> load_history(path)[0]["epoch"]
        0
    """
    return json.loads(Path(path).read_text(encoding="utf-8"))


def plot_tracking(history: Sequence[dict[str, Any]], path: str | Path,
                  statistics: Sequence[str] = ("specialization", "utilization_entropy", "imbalance", "dropped_rate"),
                  ) -> Path:
    """Curves of per-layer statistics over epochs: one panel per statistic, one line per layer.

    Args:
        history: :attr:`RoutingTracker.history` (or :func:`load_history`).
        path: The PNG file.
        statistics: Which of :data:`TRACKED` to draw.

    Raises:
        ValueError: An empty history, one without layers, or an unknown statistic.

    Example:
        >>> import tempfile, os
        >>> history = [{"epoch": e, "layers": {"a": {s: 0.1 * e for s in TRACKED}}} for e in range(3)]
        >>> plot_tracking(history, os.path.join(tempfile.mkdtemp(), "c.png")).suffix
        '.png'
    """
    if not history:
        raise ValueError("the tracking history is empty; call RoutingTracker.epoch_end() at the end of each epoch.")
    unknown = [s for s in statistics if s not in TRACKED]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {', '.join(TRACKED)}.")
    plt = require_matplotlib()
    epochs = [row["epoch"] for row in history]
    names = list(dict.fromkeys(name for row in history for name in row["layers"]))
    if not names:
        raise ValueError("the tracking history holds no MoE layer; attach the tracker to a model with MoE blocks.")
    columns = min(len(statistics), 2)
    rows = (len(statistics) + columns - 1) // columns
    figure, axes_grid = plt.subplots(rows, columns, squeeze=False, figsize=(5.0 * columns, 3.2 * rows))
    for index, statistic in enumerate(statistics):
        axes = axes_grid[index // columns][index % columns]
        for name in names:
            values = [row["layers"].get(name, {}).get(statistic, float("nan")) for row in history]
            axes.plot(epochs, values, marker="o", markersize=3, label=name)
        axes.set_title(statistic.replace("_", " "), fontsize=10)
        axes.set_xlabel("epoch")
        axes.set_xticks(epochs if len(epochs) <= 12 else epochs[:: math.ceil(len(epochs) / 12)])  # whole epochs
        axes.grid(alpha=0.3)
    for index in range(len(statistics), rows * columns):
        axes_grid[index // columns][index % columns].axis("off")
    handles, labels = axes_grid[0][0].get_legend_handles_labels()
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.legend(handles, labels, loc="lower center", ncol=min(len(names), 4), fontsize=8, frameon=False,
                  title="MoE layer", title_fontsize=8)
    return save_figure(figure, path)
