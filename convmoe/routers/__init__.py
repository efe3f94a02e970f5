"""Routers: which experts each token visits, and with what weight."""

from __future__ import annotations

from typing import Any

from torch import nn

from convmoe.registry import Registry
from convmoe.routers.base import Router, capacity_of, normalized_weights
from convmoe.routers.expert_choice import ExpertChoiceRouter
from convmoe.routers.positional import PositionalRouter
from convmoe.routers.token_choice import TokenChoiceRouter, capacity_keep_mask

ROUTERS: Registry[nn.Module] = Registry("router")
"""Routers by name: ``"token_choice"``, ``"expert_choice"`` and ``"positional"``; ``create_router`` builds them.

Example:
    >>> ROUTERS.names()
    ['expert_choice', 'positional', 'token_choice']
"""
ROUTERS.register("token_choice")(TokenChoiceRouter)
ROUTERS.register("expert_choice")(ExpertChoiceRouter)
ROUTERS.register("positional")(PositionalRouter)


def create_router(spec: str | type[nn.Module] | nn.Module, in_channels: int, num_experts: int,
                  top_k: int = 1, **kwargs: Any) -> nn.Module:
    """Build a router from a registered name, a class or an instance (returned unchanged).

    Example:
        >>> create_router("token_choice", in_channels=8, num_experts=4, top_k=2)
        TokenChoiceRouter(
          experts=4, top_k=2
          (gate): LinearGate(
            (proj): Linear(in_features=8, out_features=4, bias=True)
          )
        )
    """
    if isinstance(spec, nn.Module):
        return spec
    return ROUTERS.create(spec, in_channels=in_channels, num_experts=num_experts, top_k=top_k, **kwargs)


__all__ = [
    "ROUTERS",
    "ExpertChoiceRouter",
    "PositionalRouter",
    "Router",
    "TokenChoiceRouter",
    "capacity_keep_mask",
    "capacity_of",
    "create_router",
    "normalized_weights",
]
