"""A linear gate on each token's average."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convmoe.gates.base import gate_dtype, linear_in
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
        dtype = gate_dtype(self.proj.weight)
        if tokens.is_pixel:
            # the same linear map as a 1x1 conv over the map: a GEMM with only E output columns
            # is several times slower than the conv kernel on some CPUs (MKL on AMD)
            bias = None if self.proj.bias is None else self.proj.bias.to(dtype)
            logits = F.conv2d(tokens.source.to(dtype), self.proj.weight.to(dtype)[:, :, None, None], bias)
            return logits.flatten(2).transpose(1, 2)
        return linear_in(self.proj, tokens.mean(), dtype)
