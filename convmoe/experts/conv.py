"""A bank of convolution experts with the geometry of the conv they replace."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from convmoe.experts.base import ExpertBank, ExpertCapabilities, StackedConv
from convmoe.experts.post import ExpertPostOps
from convmoe.geometry import ConvGeometry


def _deprecated(name: str, replacement: str) -> None:
    if not torch.compiler.is_compiling():  # dynamo refuses warnings.warn in a full graph
        warnings.warn(f"{name} is deprecated; use {replacement}.", DeprecationWarning, stacklevel=3)


class ConvExperts(ExpertBank):
    """E convolutions stored as one weight, (E, C_out, C_in / groups, kh, kw), plus optional post-ops.

    Capabilities: ``gathered_columns`` (``stacked_conv()``), ``dense_forward`` (``forward_all``), and
    ``linear`` when there are no post-ops; the dispatch kernels live in :mod:`convmoe.dispatch`.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        num_experts: E.
        geometry: Kernel, stride, dilation and padding of the replaced conv.
        groups: Conv groups (C_in for depthwise).
        bias: Whether each expert has a bias.
        norm: Optional per-position norm after the conv ("layer").
        act: Optional activation after the conv ("relu", "silu", "gelu"); "relu" gives the
            "conv + ReLU" expert.

    Example:
        >>> experts = ConvExperts(4, 6, num_experts=3, geometry=ConvGeometry.create(3, padding=1))
        >>> experts.forward_all(experts.geometry.pad(torch.randn(2, 4, 5, 5))).shape
        torch.Size([2, 3, 6, 5, 5])
        >>> experts.capabilities.linear, ConvExperts(4, 6, 3, ConvGeometry.create(3), act="relu").is_linear
        (True, False)
    """

    def __init__(self, in_channels: int, out_channels: int, num_experts: int, geometry: ConvGeometry,
                 groups: int = 1, bias: bool = True, norm: str | None = None, act: str | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must both be divisible "
                             f"by groups={groups}.")
        super().__init__(in_channels, out_channels, num_experts, geometry)
        self.groups = groups
        kh, kw = geometry.kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, kh, kw,
                                               device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, device=device, dtype=dtype)) if bias else None
        self.post = ExpertPostOps(num_experts, out_channels, norm, act, device=device, dtype=dtype)
        # linear only without post-ops: a norm or activation does not commute with mixing the weights
        self.capabilities = ExpertCapabilities(gathered_columns=True, linear=self.post.is_identity, dense_forward=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform per expert, as ``nn.Conv2d`` initialises one conv."""
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel() // self.out_channels
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def load_dense(self, weight: Tensor, bias: Tensor | None, noise_std: float = 0.0) -> None:
        """Upcycle: every expert becomes a copy of a dense conv's weights (plus relative noise).

        Args:
            weight: (C_out, C_in / groups, kh, kw).
            bias: (C_out,) or None (the experts' bias, if any, is then zeroed).
            noise_std: Std of Gaussian noise relative to the weight's std, to break symmetry.
        """
        if weight.shape != self.weight.shape[1:]:
            raise ValueError(f"dense weight of shape {tuple(weight.shape)} does not fit experts of shape "
                             f"{tuple(self.weight.shape[1:])}.")
        self.weight.copy_(weight.expand_as(self.weight))
        if noise_std > 0:
            self.weight.add_(torch.randn_like(self.weight) * weight.std() * noise_std)
        if self.bias is not None:
            self.bias.copy_(bias.expand_as(self.bias) if bias is not None else torch.zeros_like(self.bias))

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        g = self.geometry
        return F.conv2d(x, weight, bias, stride=g.stride, dilation=g.dilation, groups=groups)

    def forward_all(self, x_pad: Tensor) -> Tensor:
        """Every expert on the whole padded map in one conv, (B, E, C_out, H_out, W_out)."""
        # Expert-major output channels must be regrouped group-major for a grouped conv.
        weight = rearrange(self.weight, "e (g o) i kh kw -> (g e o) i kh kw", g=self.groups)
        bias = None if self.bias is None else rearrange(self.bias, "e (g o) -> (g e o)", g=self.groups)
        y = self._conv(x_pad, weight, bias, self.groups)
        y = rearrange(y, "b (g e o) h w -> b e (g o) h w", g=self.groups, e=self.num_experts)
        return self.post(y)

    def forward_segments(self, windows: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Expert e on the e-th consecutive segment of padded-input windows, (M, C_out, h_out, w_out).

        Example:
            >>> experts = ConvExperts(2, 3, num_experts=2, geometry=ConvGeometry.create(3))
            >>> experts.forward_segments(torch.randn(3, 2, 4, 4), [1, 2]).shape
            torch.Size([3, 3, 2, 2])
        """
        counts = counts.tolist() if isinstance(counts, Tensor) else counts
        # unbind: one backward node stacks every expert's gradient (indexing would add E full-size zero tensors)
        weights = self.weight.unbind(0)
        biases = self.bias.unbind(0) if self.bias is not None else [None] * self.num_experts
        outputs = []
        for e, segment in enumerate(windows.split(counts)):
            if segment.shape[0] == 0:
                continue
            outputs.append(self.post(self._conv(segment, weights[e], biases[e], self.groups), e))
        if not outputs:
            return windows.new_zeros(0, self.out_channels, 0, 0)
        return torch.cat(outputs)

    def stacked_conv(self) -> StackedConv:
        """The experts as one stacked conv, for the gathered and merged kernels of :mod:`convmoe.dispatch`.

        Example:
            >>> ConvExperts(2, 3, num_experts=4, geometry=ConvGeometry.create(3)).stacked_conv().weight.shape
            torch.Size([4, 3, 2, 3, 3])
        """
        return StackedConv(self.weight, self.bias, self.groups, self.post)

    def forward_columns(self, columns: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Deprecated: :func:`convmoe.dispatch.gathered.gathered_experts`."""
        from convmoe.dispatch.gathered import gathered_experts

        _deprecated("ConvExperts.forward_columns", "convmoe.dispatch.gathered.gathered_experts(experts, columns, counts)")
        return gathered_experts(self, columns, counts)

    def forward_mixed(self, x_pad: Tensor, weights: Tensor) -> Tensor:
        """Deprecated: :func:`convmoe.dispatch.merged.merged_conv`."""
        from convmoe.dispatch.merged import merged_conv

        _deprecated("ConvExperts.forward_mixed", "convmoe.dispatch.merged.merged_conv(experts, x_pad, weights)")
        return merged_conv(self, x_pad, weights)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, experts={self.num_experts}, kernel_size={g.kernel_size}, "
                f"stride={g.stride}, dilation={g.dilation}, groups={self.groups}, bias={self.bias is not None}")
