"""The gate protocol: a small network from a token's summary to one logit per expert."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convmoe.types import Tokens


class Gate(Protocol):
    """Maps tokens to router logits, (B, N, E). Built with ``(in_channels, num_experts, **kwargs)``.

    Example:
        >>> from convmoe.gates import LinearGate
        >>> from convmoe.tokens import create_tokens
        >>> gate: Gate = LinearGate(8, num_experts=4)
        >>> gate(create_tokens("grid:2x2").split(torch.randn(1, 8, 6, 6))).shape
        torch.Size([1, 4, 4])
    """

    def __call__(self, tokens: Tokens) -> Tensor: ...


def gate_dtype(parameter: Tensor) -> torch.dtype:
    """The dtype gates compute in: float32, or float64 for float64 parameters, never a half type.

    A model cast to float16 (``model.half()``) keeps its router in float32, as autocast does:
    float16 logits overflow at 65504 and bfloat16 ties near-equal experts.

    Example:
        >>> gate_dtype(torch.zeros(1, dtype=torch.float16))
        torch.float32
    """
    return torch.promote_types(parameter.dtype, torch.float32)


def linear_in(layer: nn.Linear, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``layer(x)`` computed in ``dtype`` (the layer's parameters are cast, gradients flow back).

    Example:
        >>> linear_in(nn.Linear(2, 3).half(), torch.randn(4, 2), torch.float32).dtype
        torch.float32
    """
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), layer.weight.to(dtype), bias)
