"""Dispatchers: send tokens to experts and combine the results.

The strategies live here, the experts' weights and per-expert math in :mod:`convmoe.experts`: ``dense``
(the reference), and ``sparse`` with its paths ``merged`` (:mod:`~convmoe.dispatch.merged`),
``gathered`` (:mod:`~convmoe.dispatch.gathered`) and ``regions`` (:mod:`~convmoe.dispatch.regions`),
chosen from the bank's :class:`~convmoe.experts.ExpertCapabilities` in ``SparseDispatcher.choose_path``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from convmoe.dispatch.assignments import Assignments, every_pair, routed
from convmoe.dispatch.base import Dispatcher
from convmoe.dispatch.dense import DenseDispatcher
from convmoe.dispatch.sparse import SparseDispatcher
from convmoe.registry import Registry

DISPATCHERS: Registry[nn.Module] = Registry("dispatcher")
"""Dispatchers by name: ``"dense"`` (the reference) and ``"sparse"``; ``create_dispatcher`` builds them.

Example:
    >>> DISPATCHERS.names()
    ['dense', 'sparse']
"""
DISPATCHERS.register("dense")(DenseDispatcher)
DISPATCHERS.register("sparse")(SparseDispatcher)


def create_dispatcher(spec: str | type[nn.Module] | nn.Module, **kwargs: Any) -> nn.Module:
    """Build a dispatcher from ``"dense"``, ``"sparse"`` (``"sparse:gathered"``, ``"sparse:regions"``,
    ``"sparse:merged"`` force a path; the old ``"sparse:pixels"``, ``"sparse:columns"``, ``"sparse:mixed"``
    still work, with a ``DeprecationWarning``), a class or an instance.

    Example:
        >>> create_dispatcher("sparse:regions")
        SparseDispatcher(path=regions)
    """
    if isinstance(spec, str) and ":" in spec:
        name, _, path = spec.partition(":")
        return DISPATCHERS.create(name, path=path, **kwargs)
    return DISPATCHERS.create(spec, **kwargs)


__all__ = ["DISPATCHERS", "Assignments", "DenseDispatcher", "Dispatcher", "SparseDispatcher", "create_dispatcher",
           "every_pair", "routed"]
