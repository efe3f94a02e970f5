"""Active compute of an MoE layer measured over a dataset, against the dense conv it folds back into.

Counted analytically in multiply-accumulates (MACs), with the convention of :mod:`convmoe.describe`:
an expert costs its weight count per output position it computes, the shared expert likewise on
every position, and the router its gate's weight count per token. Measured sums replace the
analytic ``top_k``: a token's positions are counted once per slot that was really dispatched, so
capacity drops and expert-choice routing are priced as they ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from convmoe.analysis.collect import LayerRouting
from convmoe.describe import dense_macs_per_position, dense_params, shared_macs_per_position


@dataclass(frozen=True)
class LayerCost:
    """Compute and parameters of an MoE layer per image, and of the dense conv it folds into.

    Attributes:
        active_macs: Measured MACs per image of the MoE layer (experts + shared expert + router).
        dense_macs: MACs per image of the dense conv on the same output positions.
        macs_saved: ``active_macs - dense_macs``: what folding the layer saves per image (negative
            when the MoE layer computes less than the dense conv, e.g. with capacity drops).
        expert_slots_per_token: Dispatched slots per token, the measured ``k``.
        params: Parameters of the MoE block.
        dense_params: Parameters of the folded conv.
        params_saved: ``params - dense_params``.

    Example:
        >>> LayerCost(3.0, 2.0, 1.0, 1.0, 10, 4, 6).as_dict()["macs_saved"]
        1.0
    """

    active_macs: float
    dense_macs: float
    macs_saved: float
    expert_slots_per_token: float
    params: int
    dense_params: int
    params_saved: int

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict."""
        return asdict(self)


def layer_cost(block: nn.Module, layer: LayerRouting) -> LayerCost | None:
    """Measured per-image cost of ``block`` from its routing sums; None when no output size was recorded.

    Args:
        block: The MoE block.
        layer: Its :class:`~convmoe.analysis.collect.LayerRouting` (with positions recorded).

    Example:
        >>> import torch
        >>> from convmoe import MoEConv2d
        >>> from convmoe.analysis.collect import collect_routing
        >>> model = nn.Sequential(MoEConv2d(4, 4, 1, num_experts=4, top_k=2, tokens="grid:2x2"))
        >>> layer = collect_routing(model, [(torch.randn(2, 4, 6, 6), torch.tensor([0, 1]))]).layers["0"]
        >>> cost = layer_cost(model[0], layer)
        >>> cost.expert_slots_per_token, cost.dense_macs, cost.active_macs
        (2.0, 576.0, 1216.0)
    """
    if layer.sized_images == 0 or layer.positions == 0:
        return None
    images = layer.sized_images
    expert = block.experts.expert_macs_per_position()
    shared = shared_macs_per_position(block)
    gate = sum(p.numel() for p in block.router.parameters() if p.dim() >= 2)
    tokens_per_image = layer.tokens / layer.images if layer.images else 0.0
    positions_per_image = layer.positions / images
    active = (layer.dispatched_positions / images) * expert + positions_per_image * shared + tokens_per_image * gate
    dense = positions_per_image * dense_macs_per_position(block)
    params = sum(p.numel() for p in block.parameters())
    folded = dense_params(block)
    return LayerCost(active_macs=float(active), dense_macs=float(dense), macs_saved=float(active - dense),
                     expert_slots_per_token=float(layer.load.sum()) / layer.tokens if layer.tokens else 0.0,
                     params=params, dense_params=folded, params_saved=params - folded)
