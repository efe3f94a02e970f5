"""A bank of convolution experts with the geometry of the conv they replace."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from convmoe.dispatch.grouped import GatheredColumns, gathered_segment_matmul, segment_matmul
from convmoe.experts.post import ACTIVATIONS, ExpertPostOps
from convmoe.geometry import ConvGeometry


class ConvExperts(nn.Module):
    """E convolutions stored as one weight, (E, C_out, C_in / groups, kh, kw), plus optional post-ops.

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
    """

    patch_local = False
    accepts_gathered_columns = True  # forward_columns takes GatheredColumns (see the dispatcher's columns path)

    def __init__(self, in_channels: int, out_channels: int, num_experts: int, geometry: ConvGeometry,
                 groups: int = 1, bias: bool = True, norm: str | None = None, act: str | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must both be divisible "
                             f"by groups={groups}.")
        self.in_channels, self.out_channels, self.num_experts = in_channels, out_channels, num_experts
        self.geometry, self.groups = geometry, groups
        kh, kw = geometry.kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, kh, kw,
                                               device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, device=device, dtype=dtype)) if bias else None
        self.post = ExpertPostOps(num_experts, out_channels, norm, act, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform per expert, as ``nn.Conv2d`` initialises one conv."""
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel() // self.out_channels
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def is_linear(self) -> bool:
        return self.post.is_identity

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ConvExperts:
        """``nn.Module._apply`` that lets ``.to(memory_format=...)`` reach the experts.

        The stacked weight is 5-D, and ``Tensor.to(memory_format=torch.channels_last)`` only takes 4-D
        tensors (and sees a 5-D tensor as already contiguous): conversions are applied to the
        (E * C_out, C_in, kh, kw) view, so each expert's weight gets the layout of the ``nn.Conv2d``
        weight it replaces, and back.
        """

        def convert(t: Tensor) -> Tensor:
            if t.dim() != 5:
                return fn(t)
            try:
                return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])
            except RuntimeError:  # a conversion only 5-D tensors take (torch.channels_last_3d)
                return fn(t)

        return super()._apply(convert, recurse)

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

    def column_weight(self, channels_last: bool = False) -> Tensor:
        """Every expert's weight as a matrix over receptive-field columns, (E, C_in * kh * kw, C_out).

        Rows follow ``F.unfold``'s (C_in, kh, kw) order, or (kh, kw, C_in) with ``channels_last``
        (columns gathered from a channels-last map). Needs ``groups == 1``.
        """
        weight = self.weight if not channels_last else self.weight.permute(0, 1, 3, 4, 2)
        return weight.reshape(self.num_experts, self.out_channels, -1).transpose(1, 2)

    def forward_columns(self, columns: Tensor | GatheredColumns, counts: Tensor | list[int]) -> Tensor:
        """Expert e on the e-th segment of receptive-field columns, (M, C_out).

        The fast path for small tokens: all experts in one grouped matrix product (no host sync when
        ``counts`` is a tensor and the backend has ``grouped_mm``), instead of a conv on each window.
        On CPU, :class:`~convmoe.dispatch.grouped.GatheredColumns` are gathered and multiplied a
        cache-sized chunk at a time.

        Args:
            columns: One receptive field per output position, sorted by expert: (M, C_in * kh * kw)
                in ``F.unfold``'s order, (M, kh * kw, C_in) as gathered from a channels-last map,
                or ``GatheredColumns`` saying where to read the latter.
            counts: Rows of each expert, (E,) int tensor or list.

        Example:
            >>> experts = ConvExperts(2, 3, num_experts=2, geometry=ConvGeometry.create(3))
            >>> experts.forward_columns(torch.randn(5, 18), [2, 3]).shape
            torch.Size([5, 3])
            >>> experts.forward_columns(torch.randn(5, 9, 2), torch.tensor([2, 3])).shape
            torch.Size([5, 3])
        """
        if isinstance(columns, GatheredColumns) and (self.groups != 1 or columns.rows.device.type != "cpu"):
            columns = columns.materialize()
        channels_last = not isinstance(columns, Tensor) or columns.dim() == 3
        M = columns.shape[0]
        if self.groups == 1:
            if isinstance(columns, GatheredColumns):
                counts = counts.tolist() if isinstance(counts, Tensor) else counts
                # few rows and large weights (deep layers, small batches): transpose the columns
                # rather than reorder the experts' weights (E x C_out x K) on every call
                channels_first = self.num_experts * self.out_channels >= M
                weight = self.column_weight(channels_last=not channels_first).to(columns.rows.dtype)
                y = gathered_segment_matmul(columns, weight, counts, channels_first=channels_first)
            else:
                weight = self.column_weight(channels_last)
                y = segment_matmul(columns.flatten(1), weight.to(columns.dtype), counts)
            counts = torch.as_tensor(counts, device=y.device)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype).repeat_interleave(counts, dim=0, output_size=M)
            return self._post_rows(y, counts)
        counts = counts.tolist() if isinstance(counts, Tensor) else counts
        if self.groups == self.in_channels == self.out_channels:
            return self._depthwise_columns(columns, counts, channels_last)
        outputs = []
        groups, out_per_group = self.groups, self.out_channels // self.groups
        if channels_last:  # (M, T, C_in) -> (M, groups, T * C_in / groups), as the weight below
            columns = columns.reshape(M, -1, groups, self.in_channels // groups).transpose(1, 2)
        columns = columns.reshape(M, groups, -1)
        weights = (self.weight if not channels_last else self.weight.permute(0, 1, 3, 4, 2)).unbind(0)
        biases = self.bias.unbind(0) if self.bias is not None else [None] * self.num_experts
        for e, segment in enumerate(columns.split(counts)):
            if segment.shape[0] == 0:
                continue
            weight = weights[e].reshape(groups, out_per_group, -1).to(segment.dtype)
            y = torch.einsum("mgk,gok->mgo", segment, weight)
            y = y.reshape(segment.shape[0], self.out_channels)
            outputs.append(self._finish_rows(y, biases[e], e))
        if not outputs:
            return columns.new_zeros(0, self.out_channels)
        return torch.cat(outputs)

    def _finish_rows(self, y: Tensor, bias: Tensor | None, expert: int) -> Tensor:
        """Expert ``expert``'s bias and post-ops on its output rows (M, C_out)."""
        if bias is not None:
            y = y + bias.to(y.dtype)
        if not self.post.is_identity:
            y = self.post(y[:, :, None, None], expert)[:, :, 0, 0]
        return y

    def _depthwise_columns(self, columns: Tensor, counts: list[int], channels_last: bool) -> Tensor:
        """Depthwise experts on columns: a weighted sum over the taps per channel (a batched product of
        one-row matrices per channel would be far slower), (M, C)."""
        C = self.out_channels
        taps = columns.reshape(columns.shape[0], -1, C) if channels_last else columns.reshape(
            columns.shape[0], C, -1).transpose(1, 2)  # (M, T, C)
        weights = self.weight.flatten(1).reshape(self.num_experts, C, -1).transpose(1, 2).unbind(0)  # (T, C) each
        biases = self.bias.unbind(0) if self.bias is not None else [None] * self.num_experts
        outputs = []
        for e, segment in enumerate(taps.split(counts)):
            if segment.shape[0] == 0:
                continue
            y = (segment * weights[e].to(segment.dtype)).sum(dim=1)
            outputs.append(self._finish_rows(y, biases[e], e))
        if not outputs:
            return columns.new_zeros(0, C)
        return torch.cat(outputs)

    def _post_rows(self, y: Tensor, counts: Tensor) -> Tensor:
        """The post-ops on rows (M, C_out) sorted by expert: per-expert LayerNorm affine, then the activation."""
        post = self.post
        if post.norm == "layer":
            y = F.layer_norm(y, (self.out_channels,), eps=1e-5)
            weight = post.norm_weight.to(y.dtype).repeat_interleave(counts, dim=0, output_size=y.shape[0])
            bias = post.norm_bias.to(y.dtype).repeat_interleave(counts, dim=0, output_size=y.shape[0])
            y = torch.addcmul(bias, y, weight)
        if post.act is not None:
            y = ACTIVATIONS[post.act](y)
        return y

    def forward_mixed(self, x_pad: Tensor, weights: Tensor) -> Tensor:
        """Per-sample mixture of the experts' weights (CondConv), one grouped conv, (B, C_out, H_out, W_out).

        Exact for linear experts only: sum_e w_e (W_e * x + b_e) = (sum_e w_e W_e) * x + sum_e w_e b_e.
        """
        B = x_pad.shape[0]
        weights = weights.to(self.weight.dtype)
        expert_weight, expert_bias = self.weight, self.bias
        # Eager CPU: read only the experts some sample uses (k of E for a small batch). Not while compiling
        # or exporting: the selection has a data-dependent shape.
        if x_pad.device.type == "cpu" and not torch.compiler.is_compiling():
            used = (weights != 0).any(dim=0).nonzero().flatten()
            if used.numel() < self.num_experts:
                weights, expert_weight = weights[:, used], expert_weight[used]
                expert_bias = None if expert_bias is None else expert_bias[used]
        mixed = torch.einsum("be,eoikl->boikl", weights, expert_weight).flatten(0, 1)
        bias = None if expert_bias is None else (weights @ expert_bias).flatten()
        y = self._conv(x_pad.reshape(1, -1, *x_pad.shape[2:]), mixed, bias, self.groups * B)
        y = y.reshape(B, self.out_channels, *y.shape[2:])
        if x_pad.is_contiguous(memory_format=torch.channels_last) and not x_pad.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)  # keep the caller's memory format
        return y

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, experts={self.num_experts}, kernel_size={g.kernel_size}, "
                f"stride={g.stride}, dilation={g.dilation}, groups={self.groups}, bias={self.bias is not None}")
