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

    A bank with ``capabilities.shared_base`` (low-rank experts) also has a conv that every position
    passes through at weight 1. A dispatcher whose class sets ``adds_shared_base = True`` includes it
    in ``y`` (the built-in ones do, and the merged path folds it into each image's conv); for any
    other dispatcher the block adds it.

    A dispatcher whose class sets ``pads_itself = True`` is called as ``dispatcher(x, ..., padded=False)``
    with the unpadded input and applies the padding itself, so a path that runs whole-map convs can
    hand zero padding to the conv instead of copying the input into a padded map (the sparse
    dispatcher does).

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


def add_shared_base(experts: ExpertBank, x_pad: Tensor, y: Tensor, padding: tuple[int, int] = (0, 0)) -> Tensor:
    """``y`` plus the bank's shared base conv on ``x_pad`` (``y`` unchanged without ``shared_base``);
    ``padding`` as in :meth:`~convmoe.experts.ExpertBank.forward_base`.

    Example:
        >>> import torch
        >>> from convmoe.experts import LowRankExperts
        >>> from convmoe.geometry import ConvGeometry
        >>> experts = LowRankExperts(2, 3, num_experts=2, geometry=ConvGeometry.create(1))
        >>> x_pad = torch.randn(1, 2, 4, 4)
        >>> torch.allclose(add_shared_base(experts, x_pad, torch.zeros(1, 3, 4, 4)), experts.forward_base(x_pad))
        True
    """
    if not experts.capabilities.shared_base:
        return y
    return experts.forward_base(x_pad, padding).add_(y)
