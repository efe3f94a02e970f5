"""Residual conv experts: conv3x3-GN-SiLU-conv3x3-GN with an internal residual, one patch at a time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convmoe.experts.base import ExpertBank, ExpertCapabilities
from convmoe.geometry import ConvGeometry


def _norm_groups(channels: int, preferred: int) -> int:
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def _group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor) -> Tensor:
    # F.group_norm refuses a group of a single value, which routing produces at random (an expert
    # given one 1x1 region with one channel per group); the norm is still defined there (it gives the bias).
    return torch.group_norm(x, groups, weight, bias, 1e-5, False)


class ResidualConvExperts(ExpertBank):
    """E residual blocks, each ``x + GN(conv3x3(SiLU(GN(conv3x3(x)))))`` (1x1 projection on the skip
    when channels change), the experts of positional-convolution-expert layers.

    Every token's region is processed as an image of its own (zero padding at its border, group
    norm statistics over the region), so the bank ``sees_no_halo`` and keeps the spatial size:
    it replaces only stride-1 convs whose output has the input's size.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        num_experts: E.
        geometry: Geometry of the replaced conv; must keep the spatial size.
        norm_groups: Preferred GroupNorm groups (the largest divisor of C_out not above it is used).

    Example:
        >>> experts = ResidualConvExperts(8, 8, num_experts=2, geometry=ConvGeometry.create(3, padding=1))
        >>> experts.forward_segments(torch.randn(3, 8, 4, 4), [2, 1]).shape
        torch.Size([3, 8, 4, 4])
    """

    capabilities = ExpertCapabilities(sees_no_halo=True)

    def __init__(self, in_channels: int, out_channels: int, num_experts: int, geometry: ConvGeometry,
                 norm_groups: int = 8, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 **unused: object) -> None:
        spans = [s - 1 for s in geometry.span]
        keeps_size = geometry.stride == (1, 1) and spans == [
            geometry.padding[0] + geometry.padding[1], geometry.padding[2] + geometry.padding[3]]
        if not keeps_size:
            raise ValueError("residual experts keep the spatial size: the replaced conv needs stride 1 and 'same' "
                             f"padding, got stride={geometry.stride}, padding={geometry.padding}; use experts='conv'.")
        bad = {k: v for k, v in unused.items() if k in ("norm", "act") and v is not None}
        if bad or unused.get("groups", 1) != 1:
            raise ValueError(f"residual experts have their own norm and activation and no conv groups; got {bad or unused}.")
        # windows are the regions themselves: the experts pad inside, so a 1x1 geometry maps them
        super().__init__(in_channels, out_channels, num_experts, ConvGeometry.create(1))
        self.norm_groups = _norm_groups(out_channels, norm_groups)
        kw = {"device": device, "dtype": dtype}
        self.conv1 = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, 3, 3, **kw))
        self.conv2 = nn.Parameter(torch.empty(num_experts, out_channels, out_channels, 3, 3, **kw))
        self.norm1_weight = nn.Parameter(torch.ones(num_experts, out_channels, **kw))
        self.norm1_bias = nn.Parameter(torch.zeros(num_experts, out_channels, **kw))
        self.norm2_weight = nn.Parameter(torch.ones(num_experts, out_channels, **kw))
        self.norm2_bias = nn.Parameter(torch.zeros(num_experts, out_channels, **kw))
        self.skip = (nn.Parameter(torch.empty(num_experts, out_channels, in_channels, 1, 1, **kw))
                     if in_channels != out_channels else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.conv1, self.conv2, self.skip):
            if weight is not None:
                for e in range(self.num_experts):
                    nn.init.kaiming_uniform_(weight[e], a=math.sqrt(5))

    def forward_segments(self, windows: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Expert e on the e-th consecutive segment of regions (M, C_in, h, w), (M, C_out, h, w).

        Example:
            >>> experts = ResidualConvExperts(4, 4, num_experts=2, geometry=ConvGeometry.create(3, padding=1))
            >>> experts.forward_segments(torch.randn(3, 4, 5, 5), torch.tensor([1, 2])).shape
            torch.Size([3, 4, 5, 5])
        """
        counts = counts.tolist() if isinstance(counts, Tensor) else counts
        # unbind: one backward node per parameter stacks every expert's gradient (indexing would
        # add E full-size zero tensors per parameter)
        conv1, conv2 = self.conv1.unbind(0), self.conv2.unbind(0)
        norm1_weight, norm1_bias = self.norm1_weight.unbind(0), self.norm1_bias.unbind(0)
        norm2_weight, norm2_bias = self.norm2_weight.unbind(0), self.norm2_bias.unbind(0)
        skips = self.skip.unbind(0) if self.skip is not None else None
        outputs = []
        for e, x in enumerate(windows.split(counts)):
            if x.shape[0] == 0:
                continue
            h = F.conv2d(x, conv1[e], padding=1)
            h = F.silu(_group_norm(h, self.norm_groups, norm1_weight[e], norm1_bias[e]))
            h = _group_norm(F.conv2d(h, conv2[e], padding=1), self.norm_groups, norm2_weight[e], norm2_bias[e])
            skip = x if skips is None else F.conv2d(x, skips[e])
            outputs.append(skip + h)
        if not outputs:
            return windows.new_zeros(0, self.out_channels, *windows.shape[2:])
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, experts={self.num_experts}, norm_groups={self.norm_groups}"
