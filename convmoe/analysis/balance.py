"""Load-balance figures of a layer over many batches: utilisation, its entropy, imbalance, dead experts, drops.

Definitions match :class:`convmoe.types.RoutingStats` (one forward pass), summed over a dataset.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from convmoe.analysis.specialization import entropy


@dataclass(frozen=True)
class BalanceFigures:
    """Balance of one MoE layer over the tokens it routed.

    Attributes:
        utilization: Share of dispatched slots per expert; sums to 1 (all 0 if nothing was dispatched).
        utilization_entropy: Entropy of ``utilization`` / log(E); 1 is perfectly balanced.
        imbalance: Max over mean expert load; 1 is balanced, E is total collapse.
        dead_experts: Experts that received no token.
        dropped_rate: Share of tokens that reached no expert.
        router_entropy: Mean normalised entropy of the router probabilities; 1 uniform, 0 one-hot.

    Example:
        >>> balance_figures(torch.tensor([3.0, 1.0]), dropped=0, tokens=4).imbalance
        1.5
    """

    utilization: list[float]
    utilization_entropy: float
    imbalance: float
    dead_experts: list[int]
    dropped_rate: float
    router_entropy: float

    def as_dict(self) -> dict[str, object]:
        """The fields as a plain dict."""
        return asdict(self)


def balance_figures(load: Tensor, dropped: float, tokens: float, router_entropy: float = float("nan")) -> BalanceFigures:
    """Balance figures from the summed expert load.

    Args:
        load: Dispatched slots per expert, (E,).
        dropped: Tokens that reached no expert.
        tokens: Tokens routed.
        router_entropy: Mean normalised router entropy, passed through.

    Example:
        >>> f = balance_figures(torch.tensor([2.0, 2.0, 0.0, 0.0]), dropped=1, tokens=5)
        >>> f.utilization, f.utilization_entropy, f.dead_experts, f.dropped_rate
        ([0.5, 0.5, 0.0, 0.0], 0.5, [2, 3], 0.2)
    """
    load = load.double().cpu()
    E = load.numel()
    total = float(load.sum())
    utilization = load / total if total > 0 else torch.zeros(E, dtype=torch.float64)
    return BalanceFigures(
        utilization=[round(float(u), 6) for u in utilization],
        utilization_entropy=(entropy(load) / math.log(E) if E > 1 else 1.0) if total > 0 else 0.0,
        imbalance=float(load.max()) / (total / E) if total > 0 else 0.0,
        dead_experts=[e for e in range(E) if load[e] == 0],
        dropped_rate=float(dropped) / tokens if tokens > 0 else 0.0,
        router_entropy=float(router_entropy),
    )
