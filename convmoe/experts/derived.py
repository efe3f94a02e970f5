"""Weights derived from a bank's parameters (concatenated, scaled), kept across calls only when asked.

A derived weight (low-rank experts' W0 and every ``down`` in one conv weight, ``up`` as one matrix)
costs a copy of the parameters on every call; at batch 1 that copy is a large part of a block's
time. Inside :func:`cached_weights` (as inside ``torch.nn.utils.parametrize.cached()``) each is built
once and reused. Opt-in, because PyTorch cannot tell every change of a parameter: an in-place write
through ``.data`` does not bump the version counter. As a safety net the cache is still rebuilt when
a source tensor's storage, device, dtype or version changes (an optimizer step or ``load_state_dict``);
with autograd on, while compiling and while tracing nothing is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from convmoe.recording import is_recording

T = TypeVar("T")
_CACHE = "_derived_weights"
_ENABLED = "_derived_weights_cached"


def _key(sources: Sequence[Tensor | None]) -> tuple[Any, ...]:
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride())
                 for t in sources)


def caches_derived_weights(owner: nn.Module) -> bool:
    """Whether ``owner`` keeps its derived weights now: inside :func:`cached_weights`, without autograd,
    not compiling or tracing.

    Example:
        >>> caches_derived_weights(nn.Linear(2, 2))
        False
    """
    return bool(owner.__dict__.get(_ENABLED)) and not torch.is_grad_enabled() and not is_recording()


def derived_weight(owner: nn.Module, name: str, sources: Sequence[Tensor | None], build: Callable[[], T],
                   extra: Hashable = None) -> T:
    """``build()``; inside :func:`cached_weights`, the value kept from the last call while no tensor of
    ``sources`` and not ``extra`` changed.

    The cache keeps the sources' storages alive, so a freed storage's address cannot come back as a
    different parameter with the same version.

    Args:
        owner: The module the derived weight belongs to.
        name: Which derived weight (a module may keep several).
        sources: The tensors ``build`` reads.
        build: Computes the derived weight from ``sources``.
        extra: Any other value ``build`` reads (a scale): a different value rebuilds.

    Example:
        >>> layer = nn.Linear(2, 3)
        >>> transposed = lambda: layer.weight.t().contiguous()
        >>> with cached_weights(layer), torch.no_grad():
        ...     first = derived_weight(layer, "t", [layer.weight], transposed)
        ...     again = derived_weight(layer, "t", [layer.weight], transposed)
        ...     _ = layer.weight.mul_(2)  # an in-place update: rebuilt
        ...     updated = derived_weight(layer, "t", [layer.weight], transposed)
        >>> first is again, torch.equal(updated, 2 * first)
        (True, True)
    """
    if not caches_derived_weights(owner):
        return build()
    cache: dict[str, tuple[tuple[Any, ...], list[Any], Any]] = owner.__dict__.setdefault(_CACHE, {})
    key = (_key(sources), extra)
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[2]
    value = build()
    cache[name] = (key, [t.untyped_storage() for t in sources if t is not None], value)
    return value


@contextlib.contextmanager
def cached_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inference with fixed weights: inside, ``model``'s expert banks build their derived weights once.

    For serving or timing a model whose weights do not change. Low-rank experts then run W0 and all
    ``down`` factors as one conv (their concatenated weight is kept instead of copied per call). On
    exit the kept weights are dropped. Do not write parameters through ``.data`` inside: such a write
    is invisible to PyTorch's version counter, so the kept weights would not follow it.

    Example:
        >>> from convmoe import MoEConv2d
        >>> block = MoEConv2d(8, 8, 1, num_experts=4, experts="lowrank", expert_kwargs={"rank": 2}).eval()
        >>> x = torch.randn(1, 8, 4, 4)
        >>> with cached_weights(block), torch.no_grad():
        ...     y = block(x)
        >>> torch.allclose(y, block(x), atol=1e-6)
        True
    """
    banks = list(model.modules())
    for bank in banks:
        bank.__dict__[_ENABLED] = bank.__dict__.get(_ENABLED, 0) + 1
    try:
        yield model
    finally:
        for bank in banks:
            bank.__dict__[_ENABLED] -= 1
            if not bank.__dict__[_ENABLED]:
                del bank.__dict__[_ENABLED]
                clear_derived_weights(bank)


def clear_derived_weights(owner: nn.Module) -> None:
    """Forget every derived weight ``owner`` keeps.

    Example:
        >>> layer = nn.Linear(2, 3)
        >>> with cached_weights(layer), torch.no_grad():
        ...     _ = derived_weight(layer, "t", [layer.weight], lambda: layer.weight.t())
        >>> "_derived_weights" in layer.__dict__
        False
    """
    owner.__dict__.pop(_CACHE, None)


def without_derived_weights(state: dict[str, Any]) -> dict[str, Any]:
    """A module's ``__getstate__`` without its derived weights or the cache switch (rebuilt on demand)."""
    return {key: value for key, value in state.items() if key not in (_CACHE, _ENABLED)}
