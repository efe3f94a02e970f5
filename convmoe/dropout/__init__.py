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


def create_dropout(spec: str | type[nn.Module] | nn.Module | None, drop_rate: float | None = None,
                   **kwargs: Any) -> nn.Module | None:
    """Build a policy from a registered name, a class or an instance; None stays None.

    Args:
        spec: A registered name (``"medoe"``), a class, an instance, or None.
        drop_rate: Fraction of experts to drop; None keeps the policy's default (0.1 for MEDoE).
        **kwargs: Other keyword arguments of the policy's class.

    Example:
        >>> create_dropout("medoe", drop_rate=0.2), create_dropout("medoe")
        (MEDoEDropout(drop_rate=0.2), MEDoEDropout(drop_rate=0.1))
    """
    if spec is None:
        return None
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    return DROPOUTS.create(spec, **kwargs)


__all__ = ["DROPOUTS", "ExpertDropout", "MEDoEDropout", "create_dropout"]
