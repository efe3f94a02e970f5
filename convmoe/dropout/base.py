"""The expert-dropout protocol: which experts may be routed to in this forward pass."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class ExpertDropout(Protocol):
    """``policy(num_experts, min_keep, device) -> mask | None``; a mask is (E,) bool, True = available.

    Called in training only. ``min_keep`` (the router's top_k) is the fewest experts that must stay.
    """

    def __call__(self, num_experts: int, min_keep: int, device: torch.device) -> Tensor | None: ...
