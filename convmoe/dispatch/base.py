"""The dispatcher protocol: route tokens to experts and combine their outputs."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from convmoe.experts.base import ExpertBank
from convmoe.types import Routing, Tokens


class Dispatcher(Protocol):
    """``dispatcher(x_pad, tokens, routing, experts, out_size) -> y`` (B, C_out, H_out, W_out).

    ``x_pad`` is the input with the conv's padding already applied; ``experts`` is an
    :class:`~convmoe.experts.ExpertBank`, whose ``capabilities`` say which paths it allows.

    Example:
        >>> import torch
        >>> from convmoe import MoEConv2d
        >>> from convmoe.dispatch import DenseDispatcher
        >>> block = MoEConv2d(4, 4, 3, padding=1, num_experts=2)
        >>> x = torch.randn(1, 4, 5, 5)
        >>> x_pad = block.geometry.pad(x)
        >>> tokens = block.tokens.split(block.geometry.centre_sample(x_pad, (5, 5)))
        >>> DenseDispatcher()(x_pad, tokens, block.router(tokens), block.experts, (5, 5)).shape
        torch.Size([1, 4, 5, 5])
    """

    def __call__(self, x_pad: Tensor, tokens: Tokens, routing: Routing, experts: ExpertBank,
                 out_size: tuple[int, int]) -> Tensor: ...
