"""Experts: banks of E experts stored as stacked weights."""

from __future__ import annotations

from typing import Any

from torch import nn

from convmoe.experts.base import ExpertBank
from convmoe.experts.conv import ConvExperts
from convmoe.experts.post import ExpertPostOps
from convmoe.experts.residual import ResidualConvExperts
from convmoe.geometry import ConvGeometry
from convmoe.registry import Registry

EXPERTS: Registry[nn.Module] = Registry("experts")
"""Expert banks by name: ``"conv"`` and ``"residual"``; ``create_experts`` builds them.

Example:
    >>> EXPERTS.names()
    ['conv', 'residual']
"""
EXPERTS.register("conv")(ConvExperts)
EXPERTS.register("residual")(ResidualConvExperts)


def create_experts(spec: str | type[nn.Module] | nn.Module, in_channels: int, out_channels: int, num_experts: int,
                   geometry: ConvGeometry, **kwargs: Any) -> nn.Module:
    """Build an expert bank from a registered name, a class or an instance.

    Example:
        >>> create_experts("conv", 4, 4, num_experts=2, geometry=ConvGeometry.create(3)).weight.shape
        torch.Size([2, 4, 4, 3, 3])
    """
    if isinstance(spec, nn.Module):
        return spec
    return EXPERTS.create(spec, in_channels=in_channels, out_channels=out_channels, num_experts=num_experts,
                          geometry=geometry, **kwargs)


__all__ = ["EXPERTS", "ConvExperts", "ExpertBank", "ExpertPostOps", "ResidualConvExperts", "create_experts"]
