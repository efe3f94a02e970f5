"""The dispatcher protocol: route tokens to experts and combine their outputs."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from convmoe.types import Routing, Tokens


class Dispatcher(Protocol):
    """``dispatcher(x_pad, tokens, routing, experts, out_size) -> y`` (B, C_out, H_out, W_out).

    ``x_pad`` is the input with the conv's padding already applied; ``experts`` follows
    :class:`~convmoe.experts.ExpertBank`.
    """

    def __call__(self, x_pad: Tensor, tokens: Tokens, routing: Routing, experts, out_size: tuple[int, int]) -> Tensor: ...
