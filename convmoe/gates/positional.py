"""The positional gate: pooled patch content plus Fourier features of the patch position."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convmoe.gates.base import gate_dtype, linear_in
from convmoe.types import Tokens


def fourier_features(positions: Tensor, num_frequencies: int) -> Tensor:
    """sin/cos of 2^f * pi * p for every coordinate, (N, 2 * D * num_frequencies) for positions (N, D).

    Example:
        >>> fourier_features(torch.zeros(3, 2), 4).shape
        torch.Size([3, 16])
    """
    scales = (2.0 ** torch.arange(num_frequencies, device=positions.device)) * math.pi
    angles = positions[..., None] * scales
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class PositionalGate(nn.Module):
    """Logits = Linear(LayerNorm([avg-pool, max-pool, Fourier(position)])) for each token.

    Args:
        in_channels: Input channels C_in.
        num_experts: Experts E.
        num_frequencies: Fourier frequencies per coordinate.

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> gate = PositionalGate(8, num_experts=4)
        >>> gate(create_tokens("patch:4").split(torch.randn(2, 8, 8, 8))).shape
        torch.Size([2, 4, 4])
    """

    def __init__(self, in_channels: int, num_experts: int, *, num_frequencies: int = 4,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_frequencies = num_frequencies
        features = 2 * in_channels + 4 * num_frequencies
        self.norm = nn.LayerNorm(features, device=device, dtype=dtype)
        self.proj = nn.Linear(features, num_experts, device=device, dtype=dtype)

    def forward(self, tokens: Tokens) -> Tensor:
        dtype = gate_dtype(self.proj.weight)
        content = torch.cat([tokens.mean().to(dtype), tokens.amax().to(dtype)], dim=-1)
        position = fourier_features(tokens.centres(), self.num_frequencies).to(dtype)
        position = position.expand(content.shape[0], -1, -1)
        norm = self.norm
        features = F.layer_norm(torch.cat([content, position], dim=-1), norm.normalized_shape,
                                norm.weight.to(dtype), norm.bias.to(dtype), norm.eps)
        return linear_in(self.proj, features, dtype)
