"""A linear gate on each token's average."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convmoe.types import Tokens


class LinearGate(nn.Module):
    """Logits = Linear(mean of the token's input features), as in Shazeer et al. (2017, arXiv:1701.06538).

    Args:
        in_channels: Input channels C_in.
        num_experts: Experts E.

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> gate = LinearGate(4, num_experts=3)
        >>> gate(create_tokens("pixel").split(torch.randn(2, 4, 5, 5))).shape
        torch.Size([2, 25, 3])
    """

    def __init__(self, in_channels: int, num_experts: int, *, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, num_experts, bias=bias, device=device, dtype=dtype)

    def forward(self, tokens: Tokens) -> Tensor:
        return self.proj(tokens.mean().to(self.proj.weight.dtype))
