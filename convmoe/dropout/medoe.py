"""MEDoE: drop a random fraction of experts from routing in each training forward pass."""

from __future__ import annotations

import torch
from torch import Tensor, nn

MEDOE_DROP_RATE = 0.1
"""MEDoE's default drop rate (``MoEConfig(dropout="medoe")`` without ``drop_rate``; UPerNetMEDoE's default).

Example:
    >>> MEDoEDropout().drop_rate == MEDOE_DROP_RATE
    True
"""


class MEDoEDropout(nn.Module):
    """Mixture-of-experts dropout: in training, ``round(drop_rate * E)`` random experts (at most
    ``E - top_k``) are removed from routing for the whole forward pass; the router's softmax then
    renormalises over the rest. No effect in eval.

    Args:
        drop_rate: Fraction of experts dropped per training forward pass, in [0, 1); 0.1 by default.

    Example:
        >>> policy = MEDoEDropout(drop_rate=0.25)
        >>> int((~policy(8, min_keep=2, device=torch.device("cpu"))).sum())
        2
    """

    def __init__(self, drop_rate: float = MEDOE_DROP_RATE) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}.")
        self.drop_rate = drop_rate

    def num_dropped(self, num_experts: int, min_keep: int) -> int:
        """Experts removed per training pass."""
        return max(0, min(round(self.drop_rate * num_experts), num_experts - min_keep))

    def forward(self, num_experts: int, min_keep: int, device: torch.device) -> Tensor | None:
        dropped = self.num_dropped(num_experts, min_keep)
        if not self.training or dropped == 0:
            return None
        mask = torch.ones(num_experts, dtype=torch.bool, device=device)
        mask[torch.randperm(num_experts, device=device)[:dropped]] = False
        return mask

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}"
