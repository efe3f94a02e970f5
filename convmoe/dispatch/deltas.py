"""The deltas path: factored (low-rank) experts on every position, mixed at rank r before ``up``.

For experts ``dW_e = up_e @ down_e`` (:class:`~convmoe.experts.LowRankExperts`), the combined output
``sum_e w_e(p) up_e(down_e(x))(p)`` is ``UP @ (h * w)``: one conv to all E * r channels of ``down``,
each expert's r channels scaled by its combine weight at that position, one matrix product with the
stacked ``up`` (C_out, E * r). No gather, no scatter, shapes independent of the routing: when
E * r is small next to the channels, it costs less than gathering each routed position's receptive
field, and it is exact (the same sums, in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.experts.base import ExpertBank, StackedConv


def is_factored(experts: ExpertBank) -> bool:
    """Whether the bank's stacked conv is factored (``up`` after a rank-r conv).

    Example:
        >>> from convmoe.experts import ConvExperts, LowRankExperts
        >>> from convmoe.geometry import ConvGeometry
        >>> g = ConvGeometry.create(3)
        >>> is_factored(LowRankExperts(4, 4, 2, g)), is_factored(ConvExperts(4, 4, 2, g))
        (True, False)
    """
    return experts.capabilities.gathered_columns and experts.stacked_conv().up is not None


def mixed_deltas(experts: ExpertBank, x_pad: Tensor, weight_map: Tensor) -> Tensor:
    """Every factored expert on every position, weighted by ``weight_map`` and summed, (B, C_out, H_out, W_out).

    Args:
        experts: A bank whose stacked conv is factored (see :func:`is_factored`).
        x_pad: The padded input, (B, C_in, H_pad, W_pad).
        weight_map: Each output position's combine weight per expert, (B, E, H_out, W_out).

    Example:
        >>> from convmoe.experts import LowRankExperts
        >>> from convmoe.geometry import ConvGeometry
        >>> experts = LowRankExperts(4, 6, num_experts=3, geometry=ConvGeometry.create(3), rank=2)
        >>> _ = experts.up.data.normal_()
        >>> x_pad, weight_map = torch.randn(2, 4, 6, 6), torch.rand(2, 3, 4, 4)
        >>> expected = (experts.forward_all(x_pad) * weight_map[:, :, None]).sum(1)
        >>> torch.allclose(mixed_deltas(experts, x_pad, weight_map), expected, atol=1e-5)
        True
    """
    conv, g = experts.stacked_conv(), experts.geometry
    E, C_out, rank = conv.up.shape
    h = F.conv2d(x_pad, conv.weight.flatten(0, 1), None, stride=g.stride, dilation=g.dilation)  # (B, E * r, H, W)
    B, _, H, W = h.shape
    h = h.reshape(B, E, rank, H * W) * weight_map.reshape(B, E, 1, H * W).to(h.dtype)
    up = conv.up.permute(1, 0, 2).reshape(C_out, E * rank).to(h.dtype)
    y = torch.matmul(up, h.reshape(B, E * rank, H * W)).reshape(B, C_out, H, W)
    if x_pad.is_contiguous(memory_format=torch.channels_last) and not x_pad.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)  # keep the caller's memory format
    return y


def deltas_are_cheap(experts: ExpertBank, conv: StackedConv | None = None) -> bool:
    """Whether the deltas path should beat gathering: all E * r ``down`` channels at most C_in + C_out.

    Args:
        experts: The bank.
        conv: Its ``stacked_conv()``, when the caller has it already.

    Example:
        >>> from convmoe.experts import LowRankExperts
        >>> from convmoe.geometry import ConvGeometry
        >>> deltas_are_cheap(LowRankExperts(64, 64, 8, ConvGeometry.create(3), rank=8))
        True
    """
    conv = conv if conv is not None else experts.stacked_conv()
    return conv.up is not None and conv.up.shape[0] * conv.up.shape[2] <= experts.in_channels + experts.out_channels
