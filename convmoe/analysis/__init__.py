"""Routing analysis: where MoE layers specialise, how balanced they are, and which ones earn their cost.

```
collect_routing(model, loader)         per layer: class x expert counts, expert load, drops, positions
 ├─ specialization_score               normalised mutual information between class and expert
 ├─ balance_figures                    utilisation entropy, imbalance, dead experts, dropped tokens
 ├─ layer_cost                         active MACs against the dense conv the layer folds into
 ├─ heatmaps (CSV, PNG)                share of each class's tokens per expert, classes ordered
 └─ layer_redundancy                   fold each layer alone (convmoe.unpatch), metric change, ranking
routing_maps / plot_routing_maps       the expert of every token over the image, per layer
analyze(model, loader, out_dir)        all of the above + report.json;  model_card_section(report)
RoutingTracker                         the same statistics per epoch during training, and their curves
RoutingTrackerCallback                 the tracker run by the engine's trainer (trainer.track_routing)
```

Plots need matplotlib (``pip install 'convmoe[analysis]'``); it is imported only when a figure is drawn.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from convmoe import MoEConv2d
    >>> from convmoe.analysis import collect_routing, specialization_score
    >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2, tokens="grid:2x2"))
    >>> collection = collect_routing(model, [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))])
    >>> 0.0 <= specialization_score(collection.layers["0"].class_expert).score <= 1.0
    True
"""

from convmoe.analysis.balance import BalanceFigures, balance_figures
from convmoe.analysis.collect import (
    LayerRouting,
    RoutingCollection,
    RoutingCollector,
    collect_routing,
    routing_assignment,
)
from convmoe.analysis.cost import LayerCost, layer_cost
from convmoe.analysis.folding import fold_layer, folded_layer
from convmoe.analysis.heatmap import class_order, plot_heatmap, plot_heatmap_grid, write_heatmap_csv
from convmoe.analysis.labels import token_labels
from convmoe.analysis.layers import OutputSizeRecorder, layer_tokens, moe_layers
from convmoe.analysis.model_card import model_card_section
from convmoe.analysis.redundancy import LayerRedundancy, RedundancyReport, layer_redundancy
from convmoe.analysis.report import (
    AnalysisReport,
    LayerAnalysis,
    analyze,
    summarize_collection,
    write_heatmaps,
)
from convmoe.analysis.spatial import plot_routing_map, plot_routing_maps, routing_maps
from convmoe.analysis.specialization import SpecializationScore, mutual_information, specialization_score
from convmoe.analysis.tracking import RoutingTracker, load_history, plot_tracking
from convmoe.analysis.tracking_callback import RoutingTrackerCallback

__all__ = [
    "AnalysisReport",
    "BalanceFigures",
    "LayerAnalysis",
    "LayerCost",
    "LayerRedundancy",
    "LayerRouting",
    "OutputSizeRecorder",
    "RedundancyReport",
    "RoutingCollection",
    "RoutingCollector",
    "RoutingTracker",
    "RoutingTrackerCallback",
    "SpecializationScore",
    "analyze",
    "balance_figures",
    "class_order",
    "collect_routing",
    "fold_layer",
    "folded_layer",
    "layer_cost",
    "layer_redundancy",
    "layer_tokens",
    "load_history",
    "model_card_section",
    "moe_layers",
    "mutual_information",
    "plot_heatmap",
    "plot_heatmap_grid",
    "plot_routing_map",
    "plot_routing_maps",
    "plot_tracking",
    "routing_assignment",
    "routing_maps",
    "specialization_score",
    "summarize_collection",
    "token_labels",
    "write_heatmap_csv",
    "write_heatmaps",
]
