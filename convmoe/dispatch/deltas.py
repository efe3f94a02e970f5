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

from convmoe.dispatch.formats import in_format_of
from convmoe.experts.base import ExpertBank, StackedConv
from convmoe.experts.derived import caches_derived_weights, derived_weight


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


def mixed_deltas(experts: ExpertBank, x_pad: Tensor, weight_map: Tensor, with_base: bool = False,
                 padding: tuple[int, int] = (0, 0)) -> Tensor:
    """Every factored expert on every position, weighted by ``weight_map`` and summed, (B, C_out, H_out, W_out).

    With ``with_base`` the bank's shared base conv (``capabilities.shared_base``) is added inside the
    ``up`` product (one ``baddbmm``). Inside :func:`~convmoe.experts.derived.cached_weights` W0 and the
    ``down`` factors also run as one conv, their concatenated weight kept across calls.

    Args:
        experts: A bank whose stacked conv is factored (see :func:`is_factored`).
        x_pad: The padded input, (B, C_in, H_pad, W_pad).
        weight_map: Each output position's combine weight per expert, (B, E, H_out, W_out).
        with_base: Also add the shared base conv.
        padding: Zeros the conv adds itself, when ``x_pad`` is the unpadded input
            (``ConvGeometry.conv_padding``).

    Example:
        >>> from convmoe.experts import LowRankExperts
        >>> from convmoe.geometry import ConvGeometry
        >>> experts = LowRankExperts(4, 6, num_experts=3, geometry=ConvGeometry.create(3), rank=2)
        >>> _ = experts.up.data.normal_()
        >>> x_pad, weight_map = torch.randn(2, 4, 6, 6), torch.rand(2, 3, 4, 4)
        >>> expected = (experts.forward_all(x_pad) * weight_map[:, :, None]).sum(1)
        >>> torch.allclose(mixed_deltas(experts, x_pad, weight_map), expected, atol=1e-5)
        True
        >>> with_base = mixed_deltas(experts, x_pad, weight_map, with_base=True)
        >>> torch.allclose(with_base, expected + experts.forward_base(x_pad), atol=1e-5)
        True
    """
    conv, g = experts.stacked_conv(), experts.geometry
    E, C_out, rank = conv.up.shape
    with_base = with_base and experts.capabilities.shared_base
    # One conv for W0 and the factors only where their concatenated weight is kept: copied per call,
    # it costs more than the second conv it saves.
    fused = with_base and caches_derived_weights(experts) and experts.base_conv()[0].shape[1] == conv.weight.shape[2]
    weight, bias, up = _factored_weights(experts, conv, fused)
    out = F.conv2d(x_pad, weight, bias, stride=g.stride, padding=padding, dilation=g.dilation)  # (B, [C_out +] E*r, H, W)
    B, _, H, W = out.shape
    h = out[:, out.shape[1] - E * rank:].reshape(B, E, rank, H * W) * weight_map.reshape(B, E, 1, H * W).to(out.dtype)
    h = h.reshape(B, E * rank, H * W)
    up = up.to(h.dtype)
    if with_base:  # W0 * x + b0 + UP @ (h * w), the sum inside the product
        base = out[:, :C_out] if fused else experts.forward_base(x_pad, padding)
        y = torch.baddbmm(base.reshape(B, C_out, H * W), up.expand(B, -1, -1), h).reshape(B, C_out, H, W)
    else:
        y = torch.matmul(up, h).reshape(B, C_out, H, W)
    return in_format_of(y, x_pad)


def _factored_weights(experts: ExpertBank, conv: StackedConv, with_base: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """The conv weight ([W0 and] every ``down``), its bias, and ``up`` as one (C_out, E * r) matrix."""
    E, C_out, rank = conv.up.shape
    base = experts.base_conv() if with_base else (None, None)

    def build() -> tuple[Tensor, Tensor | None, Tensor]:
        down, up = conv.weight.flatten(0, 1), conv.up.permute(1, 0, 2).reshape(C_out, E * rank)
        if base[0] is None:
            return down, None, up
        weight = torch.cat([base[0], down.to(base[0].dtype)])
        bias = None if base[1] is None else torch.cat([base[1], base[1].new_zeros(E * rank)])
        return weight, bias, up

    name = "deltas_with_base" if with_base else "deltas"
    return derived_weight(experts, name, [conv.weight, conv.up, *base], build)


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
