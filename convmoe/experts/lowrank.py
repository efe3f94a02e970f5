"""Low-rank experts: one shared conv W0 plus, per expert, a low-rank delta (mixture of LoRA for convs).

Expert e is the delta ``scale * up_e(down_e(x))``: ``down_e`` a conv with the replaced conv's kernel,
C_in -> r, ``up_e`` a 1x1 conv r -> C_out, ``scale = alpha / r`` (LoRA's convention, Hu et al., 2021,
arXiv:2106.09685). The block adds the shared W0 on every position at weight 1, so it computes

    y = W0 * x + b0 + sum_e w_e * scale * up_e(down_e(x))

``up`` starts at zero, so an upcycled block is exactly the conv it replaces, and routing a token to
k experts costs k * r * (C_in * kh * kw + C_out) multiply-adds per position beside the one dense conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convmoe.experts.base import ExpertBank, ExpertCapabilities, StackedConv
from convmoe.experts.derived import derived_weight
from convmoe.experts.post import ExpertPostOps
from convmoe.geometry import ConvGeometry


def _check_options(rank: int, alpha: float | None, groups: int, norm: str | None, act: str | None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"low-rank experts need an int rank >= 1, got rank={rank!r}; e.g. "
                         "expert_kwargs={'rank': 8}.")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(f"low-rank experts need alpha > 0 (scale = alpha / rank), got alpha={alpha!r}; "
                         "leave it out for scale 1.")
    if groups != 1:
        raise ValueError(f"low-rank experts replace ungrouped convs (groups=1), got groups={groups}: a "
                         "depthwise or grouped conv has no channel mixing to factor; use experts='conv' there, "
                         "or target pointwise convs.")
    if norm is not None or act is not None:
        raise ValueError(f"low-rank experts are linear deltas on the shared conv; expert_norm={norm!r} and "
                         f"expert_act={act!r} must be None.")


class LowRankExperts(ExpertBank):
    """A shared conv W0 (``base_weight``, ``base_bias``) and E low-rank deltas (``down``, ``up``).

    Capabilities: ``shared_base`` (the block runs W0 once on every position), ``gathered_columns``
    (a factored stacked conv: the sparse paths run the rank-r product on routed positions only),
    ``linear`` (merged per-image experts, and ``convmoe.unpatch`` folds to one conv) and
    ``dense_forward``.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        num_experts: E.
        geometry: Kernel, stride, dilation and padding of the replaced conv (the delta's ``down``
            conv has the same).
        rank: r, the rank of every delta.
        alpha: Scale numerator: the deltas are multiplied by ``alpha / rank``; None means ``rank``
            (scale 1).
        groups: Must be 1 (a grouped conv has no channel mixing to factor).
        bias: Whether the shared conv has a bias (the deltas have none).
        norm: Must be None (present so the block's expert options reach the bank).
        act: Must be None.

    Example:
        >>> experts = LowRankExperts(16, 32, num_experts=4, geometry=ConvGeometry.create(3, padding=1), rank=4)
        >>> experts.down.shape, experts.up.shape, float(experts.up.abs().sum())
        (torch.Size([4, 4, 16, 3, 3]), torch.Size([4, 32, 4]), 0.0)
        >>> experts.forward_all(experts.geometry.pad(torch.randn(2, 16, 5, 5))).shape
        torch.Size([2, 4, 32, 5, 5])
    """

    capabilities = ExpertCapabilities(gathered_columns=True, linear=True, dense_forward=True, shared_base=True)

    def __init__(self, in_channels: int, out_channels: int, num_experts: int, geometry: ConvGeometry,
                 rank: int = 8, alpha: float | None = None, groups: int = 1, bias: bool = True,
                 norm: str | None = None, act: str | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        _check_options(rank, alpha, groups, norm, act)
        super().__init__(in_channels, out_channels, num_experts, geometry)
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.groups = 1
        kh, kw = geometry.kernel_size
        factory = {"device": device, "dtype": dtype}
        self.base_weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw, **factory))
        self.base_bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.down = nn.Parameter(torch.empty(num_experts, rank, in_channels, kh, kw, **factory))
        self.up = nn.Parameter(torch.empty(num_experts, out_channels, rank, **factory))
        self.post = ExpertPostOps(num_experts, out_channels, device=device, dtype=dtype)  # none: identity
        self.reset_parameters()

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on every delta."""
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        """W0 as ``nn.Conv2d`` initialises a conv; ``down`` Kaiming-uniform per expert; ``up`` zero."""
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        if self.base_bias is not None:
            bound = 1 / math.sqrt(self.base_weight[0].numel()) if self.base_weight[0].numel() else 0.0
            nn.init.uniform_(self.base_bias, -bound, bound)
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.down[e], a=math.sqrt(5))
        nn.init.zeros_(self.up)

    @torch.no_grad()
    def load_dense(self, weight: Tensor, bias: Tensor | None, noise_std: float = 0.0) -> None:
        """Upcycle: W0 becomes the dense conv, every ``up`` zero, so the block is exactly the conv.

        ``noise_std`` is not used: the random ``down`` factors already tell the experts apart once
        ``up`` moves.
        """
        if weight.shape != self.base_weight.shape:
            raise ValueError(f"dense weight of shape {tuple(weight.shape)} does not fit the shared conv of shape "
                             f"{tuple(self.base_weight.shape)}.")
        self.base_weight.copy_(weight)
        if self.base_bias is not None:
            self.base_bias.copy_(bias if bias is not None else torch.zeros_like(self.base_bias))
        self.up.zero_()

    def base_conv(self) -> tuple[Tensor, Tensor | None]:
        """The shared conv W0: (weight (C_out, C_in, kh, kw), bias (C_out,) or None)."""
        return self.base_weight, self.base_bias

    def stacked_conv(self) -> StackedConv:
        """The deltas as a factored stacked conv: ``down`` (E, r, C_in, kh, kw), ``up * scale`` (E, C_out, r).

        Example:
            >>> conv = LowRankExperts(4, 6, 3, ConvGeometry.create(3), rank=2).stacked_conv()
            >>> conv.column_weight().shape, conv.full_weight().shape
            (torch.Size([3, 36, 2]), torch.Size([3, 6, 4, 3, 3]))
        """
        scale = self.scale
        up = self.up if scale == 1 else derived_weight(self, "scaled_up", [self.up], lambda: self.up * scale, scale)
        return StackedConv(self.down, None, 1, self.post, up=up)

    def _down(self, x: Tensor, weight: Tensor) -> Tensor:
        g = self.geometry
        return F.conv2d(x, weight, None, stride=g.stride, dilation=g.dilation)

    def forward_all(self, x_pad: Tensor) -> Tensor:
        """Every delta on the whole padded map, (B, E, C_out, H_out, W_out): one conv to E * r channels."""
        h = self._down(x_pad, self.down.flatten(0, 1))  # (B, E * r, H, W)
        h = h.unflatten(1, (self.num_experts, self.rank))
        return torch.einsum("berhw,eor->beohw", h, self.stacked_conv().up.to(h.dtype))

    def forward_segments(self, windows: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Delta e on the e-th consecutive segment of padded-input windows, (M, C_out, h_out, w_out).

        Example:
            >>> experts = LowRankExperts(2, 3, num_experts=2, geometry=ConvGeometry.create(3), rank=2)
            >>> experts.forward_segments(torch.randn(3, 2, 4, 4), [1, 2]).shape
            torch.Size([3, 3, 2, 2])
        """
        counts = counts.tolist() if isinstance(counts, Tensor) else counts
        downs, ups = self.down.unbind(0), self.stacked_conv().up.unbind(0)
        outputs = []
        for e, segment in enumerate(windows.split(counts)):
            if segment.shape[0] == 0:
                continue
            h = self._down(segment, downs[e])
            outputs.append(torch.einsum("mrhw,or->mohw", h, ups[e].to(h.dtype)))
        if not outputs:
            return windows.new_zeros(0, self.out_channels, 0, 0)
        return torch.cat(outputs)

    def expert_macs_per_position(self) -> float:
        """``r * (C_in * kh * kw + C_out)``: one delta's down and up convs per output position."""
        return float(self.down[0].numel() + self.up[0].numel())

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, experts={self.num_experts}, rank={self.rank}, "
                f"alpha={self.alpha:g}, kernel_size={g.kernel_size}, stride={g.stride}, dilation={g.dilation}, "
                f"bias={self.base_bias is not None}")
