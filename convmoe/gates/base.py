"""The gate protocol: a small network from a token's summary to one logit per expert."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from convmoe.types import Tokens


class Gate(Protocol):
    """Maps tokens to router logits, (B, N, E). Built with ``(in_channels, num_experts, **kwargs)``."""

    def __call__(self, tokens: Tokens) -> Tensor: ...
