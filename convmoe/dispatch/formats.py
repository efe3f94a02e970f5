"""The memory format a dispatch path returns: the caller's."""

from __future__ import annotations

import torch
from torch import Tensor


def wants_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a channels-last 4-D map (and not also contiguous, as a 1x1 map or one channel is).

    Example:
        >>> wants_channels_last(torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last))
        True
    """
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def channels_innermost(x: Tensor) -> bool:
    """Whether ``x``'s channels are its innermost dimension (a channels-last map, or a strided view of one), on a
    map of more than one position and channel, where the layouts differ.

    Example:
        >>> x = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> channels_innermost(x[..., ::2, ::2]), channels_innermost(torch.randn(1, 3, 4, 4))
        (True, False)
    """
    return x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1


def in_format_of(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in the memory format of the caller's input ``x`` (channels-last when ``x`` is; the values stay).

    Example:
        >>> x = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> in_format_of(torch.randn(1, 5, 4, 4), x).is_contiguous(memory_format=torch.channels_last)
        True
    """
    return y.contiguous(memory_format=torch.channels_last) if wants_channels_last(x) else y
