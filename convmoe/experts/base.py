"""The expert-bank contract: E experts stored together, computed per expert segment.

Every bank subclasses :class:`ExpertBank` and implements ``forward_segments``; what else it offers
is declared in its :class:`ExpertCapabilities`, from which the dispatchers choose their paths (they
never probe a bank for methods).
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from convmoe.geometry import ConvGeometry

if TYPE_CHECKING:
    from convmoe.experts.post import ExpertPostOps


@dataclass(frozen=True)
class ExpertCapabilities:
    """What a bank offers beyond ``forward_segments``: the fast and reference paths it allows.

    Attributes:
        sees_no_halo: Every token's region is processed as an image of its own (zero padding at its
            border, statistics over the region), so a token does not see its neighbours' pixels.
            False: an expert's output at a position depends only on its receptive field, as a conv's.
        gathered_columns: The experts are convolutions followed by per-position ops, exposed by
            ``stacked_conv()``: the gathered-columns matrix-product kernel of the sparse
            dispatcher (:mod:`convmoe.dispatch.gathered`) can run them.
        linear: The experts are linear in their weights, so mixing the weights of each image's experts
            is exact (sum_e w_e (W_e * x + b_e) = (sum_e w_e W_e) * x + sum_e w_e b_e); with
            ``gathered_columns`` this allows the merged path (:mod:`convmoe.dispatch.merged`).
        dense_forward: ``forward_all`` runs every expert on the whole padded map (the dense reference
            dispatcher's fast form; without it the reference runs every expert on every region).

    Example:
        >>> ExpertCapabilities(gathered_columns=True, linear=True)
        ExpertCapabilities(sees_no_halo=False, gathered_columns=True, linear=True, dense_forward=False)
    """

    sees_no_halo: bool = False
    gathered_columns: bool = False
    linear: bool = False
    dense_forward: bool = False


@dataclass(frozen=True)
class StackedConv:
    """A bank's experts as one stacked conv, what the gathered and merged kernels read.

    Attributes:
        weight: (E, C_out, C_in / groups, kh, kw); the geometry is the bank's.
        bias: (E, C_out) or None.
        groups: Conv groups (C_in for depthwise).
        post: Per-position ops after each expert's conv (an :class:`~convmoe.experts.ExpertPostOps`).

    Example:
        >>> from convmoe.experts import ConvExperts
        >>> conv = ConvExperts(4, 6, num_experts=3, geometry=ConvGeometry.create(3)).stacked_conv()
        >>> conv.column_weight().shape  # (E, C_in * kh * kw, C_out)
        torch.Size([3, 36, 6])
    """

    weight: Tensor
    bias: Tensor | None
    groups: int
    post: ExpertPostOps

    def column_weight(self, channels_last: bool = False) -> Tensor:
        """Every expert's weight as a matrix over receptive-field columns, (E, C_in * kh * kw, C_out).

        Rows follow ``F.unfold``'s (C_in, kh, kw) order, or (kh, kw, C_in) with ``channels_last``
        (columns gathered from a channels-last map). Needs ``groups == 1``.
        """
        weight = self.weight if not channels_last else self.weight.permute(0, 1, 3, 4, 2)
        return weight.reshape(weight.shape[0], weight.shape[1], -1).transpose(1, 2)


_CAPABILITY_METHODS = {"gathered_columns": "stacked_conv", "dense_forward": "forward_all"}


class ExpertBank(nn.Module, abc.ABC):
    """Base of every expert bank: E experts stored together, run on the segments a dispatcher sorts.

    Required: ``forward_segments`` (abstract), and ``in_channels``, ``out_channels``, ``num_experts``
    and ``geometry`` given to ``__init__``. Optional, declared in ``capabilities`` (default: none):
    ``stacked_conv()`` for ``gathered_columns`` (and the merged path when ``linear``), ``forward_all``
    for ``dense_forward``. A class attribute ``capabilities`` that declares a capability without its
    method fails at class creation; a bank without ``forward_segments`` cannot be instantiated.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        num_experts: E.
        geometry: How output positions map to windows of the (explicitly padded) input: a dispatcher
            hands each expert the window of padded input behind a token's region.

    Example:
        >>> class ScaledOneByOne(ExpertBank):  # E per-expert scales of the input
        ...     def __init__(self, channels, num_experts):
        ...         super().__init__(channels, channels, num_experts, ConvGeometry.create(1))
        ...         self.scale = nn.Parameter(torch.ones(num_experts))
        ...     def forward_segments(self, windows, counts):
        ...         counts = counts.tolist() if isinstance(counts, Tensor) else counts
        ...         return windows * self.scale.repeat_interleave(torch.tensor(counts))[:, None, None, None]
        >>> bank = ScaledOneByOne(4, num_experts=3)
        >>> bank.capabilities.gathered_columns, bank.forward_segments(torch.randn(5, 4, 1, 1), [2, 0, 3]).shape
        (False, torch.Size([5, 4, 1, 1]))
    """

    capabilities: ExpertCapabilities = ExpertCapabilities()

    def __init__(self, in_channels: int, out_channels: int, num_experts: int, geometry: ConvGeometry) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.num_experts = in_channels, out_channels, num_experts
        self.geometry = geometry

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("capabilities")
        if isinstance(declared, ExpertCapabilities):
            for flag, method in _CAPABILITY_METHODS.items():
                if getattr(declared, flag) and getattr(cls, method) is getattr(ExpertBank, method):
                    raise TypeError(f"{cls.__name__} declares capabilities.{flag}=True but does not implement "
                                    f"{method}(); implement it or drop the flag.")

    @abc.abstractmethod
    def forward_segments(self, windows: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Run expert e on the e-th consecutive segment of ``windows``.

        Args:
            windows: Padded-input windows sorted by expert, (M, C_in, h_in, w_in).
            counts: Windows of each expert, (E,) int tensor or list summing to M.

        Returns:
            (M, C_out, h_out, w_out), in the order of ``windows``.
        """

    def stacked_conv(self) -> StackedConv:
        """The experts as one stacked conv; required when ``capabilities.gathered_columns``."""
        raise NotImplementedError(f"{type(self).__name__} is not a stacked conv (capabilities.gathered_columns is "
                                  "False); dispatch it with path='regions' or 'auto'.")

    def forward_all(self, x_pad: Tensor) -> Tensor:
        """Every expert on the whole padded map, (B, E, C_out, H_out, W_out); required when
        ``capabilities.dense_forward``."""
        raise NotImplementedError(f"{type(self).__name__} has no forward_all (capabilities.dense_forward is False).")

    @property
    def is_linear(self) -> bool:
        """Shorthand for ``capabilities.linear``."""
        return self.capabilities.linear

    @property
    def patch_local(self) -> bool:
        """Deprecated: ``capabilities.sees_no_halo``."""
        if not torch.compiler.is_compiling():  # dynamo refuses warnings.warn in a full graph
            warnings.warn("ExpertBank.patch_local is deprecated; use capabilities.sees_no_halo.", DeprecationWarning,
                          stacklevel=2)
        return self.capabilities.sees_no_halo
