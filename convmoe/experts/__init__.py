"""Experts: banks of E experts stored as stacked weights.

Every bank subclasses :class:`ExpertBank` (the contract) and declares its :class:`ExpertCapabilities`;
the dispatch strategies that use them live in :mod:`convmoe.dispatch`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from convmoe.experts.base import ExpertBank, ExpertCapabilities, StackedConv
from convmoe.experts.conv import ConvExperts
from convmoe.experts.lowrank import LowRankExperts
from convmoe.experts.post import ExpertPostOps
from convmoe.experts.residual import ResidualConvExperts
from convmoe.geometry import ConvGeometry
from convmoe.registry import Registry

EXPERTS: Registry[ExpertBank] = Registry("experts")
"""Expert banks by name: ``"conv"``, ``"lowrank"`` and ``"residual"``; ``create_experts`` builds them. A bank registered
here (``EXPERTS.register("mine")(MyBank)``) must subclass :class:`ExpertBank`.

Example:
    >>> EXPERTS.names()
    ['conv', 'lowrank', 'residual']
"""
EXPERTS.register("conv")(ConvExperts)
EXPERTS.register("lowrank")(LowRankExperts)
EXPERTS.register("residual")(ResidualConvExperts)


def create_experts(spec: str | type[ExpertBank] | ExpertBank, in_channels: int, out_channels: int, num_experts: int,
                   geometry: ConvGeometry, **kwargs: Any) -> ExpertBank:
    """Build an expert bank from a registered name, a class or an instance.

    Raises:
        TypeError: The bank does not subclass :class:`ExpertBank`.

    Example:
        >>> create_experts("conv", 4, 4, num_experts=2, geometry=ConvGeometry.create(3)).weight.shape
        torch.Size([2, 4, 4, 3, 3])
    """
    bank = spec if isinstance(spec, nn.Module) else EXPERTS.create(
        spec, in_channels=in_channels, out_channels=out_channels, num_experts=num_experts, geometry=geometry, **kwargs)
    if not isinstance(bank, ExpertBank):
        raise TypeError(f"experts {type(bank).__name__} do not subclass convmoe.experts.ExpertBank; subclass it and "
                        "implement forward_segments (and declare capabilities for the fast paths).")
    return bank


__all__ = ["EXPERTS", "ConvExperts", "ExpertBank", "ExpertCapabilities", "ExpertPostOps", "LowRankExperts",
           "ResidualConvExperts",
           "StackedConv", "create_experts"]
