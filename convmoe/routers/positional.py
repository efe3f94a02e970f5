"""The positional router: positional gate, softmax with temperature, top-1 with a capacity limit."""

from __future__ import annotations

from typing import Any

from convmoe.routers.base import DEFAULT_CAPACITY_FACTOR
from convmoe.routers.token_choice import TokenChoiceRouter


class PositionalRouter(TokenChoiceRouter):
    """Top-1 token choice over a :class:`~convmoe.gates.PositionalGate` with a capacity limit.

    Token summary = concat(average pool, max pool) over the patch plus Fourier features of the
    patch position, then LayerNorm, Linear, ``softmax(logits / tau)``; tokens over an expert's
    capacity are dropped and counted in the routing statistics. This is the router of
    positional-convolution-expert layers.

    Args:
        in_channels: Input channels C_in.
        num_experts: Experts E.
        top_k: Experts per token (default 1).
        **kwargs: As for :class:`~convmoe.routers.TokenChoiceRouter`; ``capacity_factor`` defaults to ``DEFAULT_CAPACITY_FACTOR`` (1.25)
            and the gate to ``"positional"``.

    Example:
        >>> import torch
        >>> from convmoe.tokens import create_tokens
        >>> router = PositionalRouter(8, num_experts=4)
        >>> routing = router(create_tokens("patch:2").split(torch.randn(2, 8, 8, 8)))
        >>> routing.capacity
        5
    """

    default_gate = "positional"

    def __init__(self, in_channels: int, num_experts: int, top_k: int = 1, **kwargs: Any) -> None:
        if kwargs.get("capacity_factor") is None:
            kwargs["capacity_factor"] = DEFAULT_CAPACITY_FACTOR
        super().__init__(in_channels, num_experts, top_k, **kwargs)
