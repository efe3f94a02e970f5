"""How two state dicts differ: the one comparison behind every "weights do not match" message."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class StateDifference:
    """What ``given`` lacks, what it has too many of, and where shapes differ, against ``expected``.

    Attributes:
        missing: Names in ``expected`` and not in ``given``, in ``expected``'s order.
        unexpected: Names in ``given`` and not in ``expected``, in ``given``'s order.
        mismatched: ``(name, given shape, expected shape)`` for tensors in both, in ``expected``'s order.

    Example:
        >>> import torch
        >>> difference = compare_states({"a": torch.zeros(2), "b": torch.zeros(1)}, {"a": torch.zeros(3)})
        >>> difference.missing, difference.mismatched, bool(difference)
        (['b'], [('a', (3,), (2,))], True)
    """

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def compare_states(expected: Mapping[str, Any], given: Mapping[str, Any]) -> StateDifference:
    """The :class:`StateDifference` of ``given`` against ``expected`` (non-tensor entries have no shape).

    Example:
        >>> import torch
        >>> bool(compare_states({"w": torch.zeros(2)}, {"w": torch.ones(2)}))
        False
    """
    return StateDifference(
        missing=[name for name in expected if name not in given],
        unexpected=[name for name in given if name not in expected],
        mismatched=[(name, tuple(given[name].shape), tuple(tensor.shape)) for name, tensor in expected.items()
                    if name in given and isinstance(given[name], Tensor) and isinstance(tensor, Tensor)
                    and given[name].shape != tensor.shape])
