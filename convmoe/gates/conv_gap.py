"""A two-conv gate on globally average-pooled token features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convmoe.gates.base import gate_dtype, linear_in
from convmoe.types import Tokens


class ConvGAPGate(nn.Module):
    """Average-pool each token, then conv1x1 -> ReLU -> conv1x1 to one logit per expert.

    The gate of patch-wise segmentation MoE layers: a small two-layer network on the patch's
    global-average-pooled features (1x1 convs on a pooled map are a two-layer MLP, computed here as one).

    Args:
        in_channels: Input channels C_in.
        num_experts: Experts E.
        hidden_channels: Width of the hidden layer (default: max(C_in // 4, 8)).

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> gate = ConvGAPGate(16, num_experts=4)
        >>> gate(create_tokens("grid:3x3").split(torch.randn(2, 16, 9, 9))).shape
        torch.Size([2, 9, 4])
    """

    def __init__(self, in_channels: int, num_experts: int, *, hidden_channels: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        hidden = hidden_channels or max(in_channels // 4, 8)
        self.reduce = nn.Linear(in_channels, hidden, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.expand = nn.Linear(hidden, num_experts, device=device, dtype=dtype)

    def forward(self, tokens: Tokens) -> Tensor:
        dtype = gate_dtype(self.reduce.weight)
        return linear_in(self.expand, self.act(linear_in(self.reduce, tokens.mean(), dtype)), dtype)
