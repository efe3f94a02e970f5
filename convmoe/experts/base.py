"""The expert-bank protocol: E experts stored together, computed per expert segment."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from convmoe.geometry import ConvGeometry


class ExpertBank(Protocol):
    """What dispatchers need from a bank of experts.

    Attributes:
        num_experts: E.
        in_channels / out_channels: C_in / C_out.
        geometry: How output positions map to windows of the (explicitly padded) input. A dispatcher
            hands each expert the window of padded input behind a token's region.
        patch_local: False when an expert's output at a position depends only on its receptive
            field (a conv: tokens see a true halo and ``forward_all`` is exact); True when every token's
            region is processed as an image of its own (no halo).
        is_linear: True when the expert is linear in its weights, so experts can be mixed per sample.

    Example:
        >>> import torch
        >>> from convmoe.experts import ConvExperts
        >>> bank = ConvExperts(4, 6, num_experts=3, geometry=ConvGeometry.create(3))
        >>> bank.patch_local, bank.is_linear
        (False, True)
        >>> bank.forward_segments(torch.randn(5, 4, 3, 3), [2, 0, 3]).shape  # expert 0: 2 windows, expert 2: 3
        torch.Size([5, 6, 1, 1])
    """

    num_experts: int
    in_channels: int
    out_channels: int
    geometry: ConvGeometry
    patch_local: bool
    is_linear: bool

    def forward_segments(self, windows: Tensor, counts: list[int]) -> Tensor:
        """Run expert e on the e-th consecutive segment of ``windows`` (M, C_in, h_in, w_in)."""
        ...
