"""The expert-dropout protocol: which experts may be routed to in this forward pass."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class ExpertDropout(Protocol):
    """``policy(num_experts, min_keep, device) -> mask | None``; a mask is (E,) bool, True = available.

    Called in training only. ``min_keep`` (the router's top_k) is the fewest experts that must stay.

    Example:
        >>> from convmoe import MoEConv2d
        >>> def without_expert_0(num_experts, min_keep, device):
        ...     mask = torch.ones(num_experts, dtype=torch.bool, device=device)
        ...     mask[0] = False
        ...     return mask
        >>> block = MoEConv2d(4, 4, 1, num_experts=4, top_k=1, dropout=without_expert_0).train()
        >>> _ = block(torch.randn(2, 4, 5, 5))
        >>> 0 in block.last_routing.expert_index.flatten().tolist()
        False
    """

    def __call__(self, num_experts: int, min_keep: int, device: torch.device) -> Tensor | None: ...
