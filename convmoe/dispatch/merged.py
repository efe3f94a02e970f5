"""The merged path: mix each image's expert weights into one conv (CondConv), one grouped conv for the batch.

Exact for linear experts only: sum_e w_e (W_e * x + b_e) = (sum_e w_e W_e) * x + sum_e w_e b_e
(Yang et al., 2019, CondConv, arXiv:1904.04971). Applies when every image is one token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.experts.base import ExpertBank


def merged_conv(experts: ExpertBank, x_pad: Tensor, weights: Tensor) -> Tensor:
    """Each image through the weighted sum of the experts' convs, (B, C_out, H_out, W_out).

    Args:
        experts: A bank whose capabilities are ``gathered_columns`` (a stacked conv) and ``linear``.
        x_pad: The padded input, (B, C_in, H_pad, W_pad).
        weights: Each image's combine weight per expert, (B, E).

    Example:
        >>> from convmoe.experts import ConvExperts
        >>> from convmoe.geometry import ConvGeometry
        >>> experts = ConvExperts(4, 6, num_experts=3, geometry=ConvGeometry.create(3))
        >>> x_pad, weights = torch.randn(2, 4, 5, 5), torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]])
        >>> expected = (experts.forward_all(x_pad) * weights[:, :, None, None, None]).sum(1)
        >>> torch.allclose(merged_conv(experts, x_pad, weights), expected, atol=1e-5)
        True
    """
    conv, g = experts.stacked_conv(), experts.geometry
    B = x_pad.shape[0]
    weights = weights.to(conv.weight.dtype)
    expert_weight, expert_bias = conv.weight, conv.bias
    # Eager CPU: read only the experts some sample uses (k of E for a small batch). Not while compiling
    # or exporting: the selection has a data-dependent shape.
    if x_pad.device.type == "cpu" and not torch.compiler.is_compiling():
        used = (weights != 0).any(dim=0).nonzero().flatten()
        if used.numel() < experts.num_experts:
            weights, expert_weight = weights[:, used], expert_weight[used]
            expert_bias = None if expert_bias is None else expert_bias[used]
    mixed = torch.einsum("be,eoikl->boikl", weights, expert_weight).flatten(0, 1)
    bias = None if expert_bias is None else (weights @ expert_bias).flatten()
    y = F.conv2d(x_pad.reshape(1, -1, *x_pad.shape[2:]), mixed, bias, stride=g.stride, dilation=g.dilation,
                 groups=conv.groups * B)
    y = y.reshape(B, experts.out_channels, *y.shape[2:])
    if x_pad.is_contiguous(memory_format=torch.channels_last) and not x_pad.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)  # keep the caller's memory format
    return y
