"""A cache for the small constant tensors a layout needs (token maps, index tensors), bypassed while compiling."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def layout_cache(maxsize: int) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``functools.lru_cache(maxsize)`` in eager mode; the plain function while ``torch.compile`` traces.

    A model calls every block with the same few sizes, so eager calls build each tensor once. Dynamo
    ignores an ``lru_cache`` wrapper and warns at every call it traces; inside a graph the tensor is a
    constant anyway, so tracing calls the function itself and nothing warns.

    Example:
        >>> @layout_cache(maxsize=4)
        ... def arange(n: int) -> torch.Tensor:
        ...     return torch.arange(n)
        >>> arange(3) is arange(3)
        True
    """
    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        cached = functools.lru_cache(maxsize=maxsize)(function)

        @functools.wraps(function)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            if torch.compiler.is_compiling():
                return function(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call

    return decorate
