"""Gate networks: token summary -> one logit per expert."""

from __future__ import annotations

from typing import Any

from torch import nn

from convmoe.gates.base import Gate
from convmoe.gates.conv_gap import ConvGAPGate
from convmoe.gates.linear import LinearGate
from convmoe.gates.positional import PositionalGate, fourier_features
from convmoe.registry import Registry

GATES: Registry[nn.Module] = Registry("gate")
"""Gate networks by name: ``"linear"``, ``"conv_gap"`` and ``"positional"``; ``create_gate`` builds them.

Example:
    >>> GATES.names()
    ['conv_gap', 'linear', 'positional']
"""
GATES.register("linear")(LinearGate)
GATES.register("conv_gap")(ConvGAPGate)
GATES.register("positional")(PositionalGate)


def create_gate(spec: str | type[nn.Module] | nn.Module, in_channels: int, num_experts: int,
                **kwargs: Any) -> nn.Module:
    """Build a gate from a registered name, a class or an instance.

    Example:
        >>> create_gate("linear", in_channels=8, num_experts=4).proj.out_features
        4
    """
    if isinstance(spec, nn.Module):
        return spec
    return GATES.create(spec, in_channels=in_channels, num_experts=num_experts, **kwargs)


__all__ = ["GATES", "ConvGAPGate", "Gate", "LinearGate", "PositionalGate", "create_gate", "fourier_features"]
