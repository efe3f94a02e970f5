"""Expert-dropout policies (MEDoE and the protocol for others)."""

from __future__ import annotations

from typing import Any

from torch import nn

from convmoe.dropout.base import ExpertDropout
from convmoe.dropout.medoe import MEDoEDropout
from convmoe.registry import Registry

DROPOUTS: Registry[nn.Module] = Registry("expert dropout")
"""Expert-dropout policies by name (``"medoe"``); register your own with ``DROPOUTS.register("name")``.

Example:
    >>> DROPOUTS.names()
    ['medoe']
"""
DROPOUTS.register("medoe")(MEDoEDropout)


def create_dropout(spec: str | type[nn.Module] | nn.Module | None, **kwargs: Any) -> nn.Module | None:
    """Build a policy from a registered name, a class or an instance; None stays None.

    Example:
        >>> create_dropout("medoe", drop_rate=0.2)
        MEDoEDropout(drop_rate=0.2)
    """
    if spec is None:
        return None
    return DROPOUTS.create(spec, **kwargs)


__all__ = ["DROPOUTS", "ExpertDropout", "MEDoEDropout", "create_dropout"]
