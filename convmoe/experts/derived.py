"""Weights derived from a bank's parameters (concatenated, permuted), built once per change at inference.

A derived weight (W0 and every ``down`` in one conv weight, ``up`` as one matrix) costs a copy of
the parameters on every call; at batch 1 that copy is a large part of a block's time. Without
autograd, nothing reads the graph of that copy, so it is kept and reused until a source parameter
changes: a different storage, device or dtype, or an in-place update (an optimizer step or
``load_state_dict`` bumps the tensor's version counter). With autograd on, while compiling and while
exporting it is rebuilt on every call, so gradients and traced graphs are as before.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")
_CACHE = "_derived_weights"


def _key(sources: Sequence[Tensor | None]) -> tuple[Any, ...]:
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride())
                 for t in sources)


def derived_weight(owner: nn.Module, name: str, sources: Sequence[Tensor | None], build: Callable[[], T],
                   extra: Hashable = None) -> T:
    """``build()``, reused while no tensor of ``sources`` and not ``extra`` changed, and autograd is off.

    The cache keeps the sources' storages alive, so a freed storage's address cannot come back as a
    different parameter with the same version. :func:`clear_derived_weights` drops it (the bank does on
    ``.to()``, and a pickled bank carries none).

    Args:
        owner: The module the derived weight belongs to.
        name: Which derived weight (a module may keep several).
        sources: The tensors ``build`` reads.
        build: Computes the derived weight from ``sources``.
        extra: Any other value ``build`` reads (a scale): a different value rebuilds.

    Example:
        >>> layer = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     first = derived_weight(layer, "t", [layer.weight], lambda: layer.weight.t().contiguous())
        ...     again = derived_weight(layer, "t", [layer.weight], lambda: layer.weight.t().contiguous())
        ...     _ = layer.weight.mul_(2)  # an in-place update: rebuilt
        ...     updated = derived_weight(layer, "t", [layer.weight], lambda: layer.weight.t().contiguous())
        >>> first is again, torch.equal(updated, 2 * first)
        (True, True)
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return build()
    cache: dict[str, tuple[tuple[Any, ...], list[Any], Any]] = owner.__dict__.setdefault(_CACHE, {})
    key = (_key(sources), extra)
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[2]
    value = build()
    cache[name] = (key, [t.untyped_storage() for t in sources if t is not None], value)
    return value


def clear_derived_weights(owner: nn.Module) -> None:
    """Forget every derived weight of ``owner``.

    Example:
        >>> layer = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = derived_weight(layer, "t", [layer.weight], lambda: layer.weight.t())
        >>> clear_derived_weights(layer)
        >>> "_derived_weights" in layer.__dict__
        False
    """
    owner.__dict__.pop(_CACHE, None)


def without_derived_weights(state: dict[str, Any]) -> dict[str, Any]:
    """A module's ``__getstate__`` without its derived weights (they are rebuilt on demand)."""
    return {key: value for key, value in state.items() if key != _CACHE}
