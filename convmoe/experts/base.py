"""The expert-bank contract: E experts stored together, computed per expert segment.

Every bank subclasses :class:`ExpertBank` and implements ``forward_segments``; what else it offers
is declared in its :class:`ExpertCapabilities`, from which the dispatchers choose their paths (they
never probe a bank for methods).
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convmoe.experts.derived import clear_derived_weights, without_derived_weights
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
        shared_base: Beside the routed experts the bank has one conv, ``base_conv()``, that the block
            runs on every position at weight 1 (``forward_base``): the shared W0 of low-rank experts,
            whose routed experts are then deltas on it.

    Example:
        >>> ExpertCapabilities(gathered_columns=True, linear=True)
        ExpertCapabilities(sees_no_halo=False, gathered_columns=True, linear=True, dense_forward=False, shared_base=False)
    """

    sees_no_halo: bool = False
    gathered_columns: bool = False
    linear: bool = False
    dense_forward: bool = False
    shared_base: bool = False


@dataclass(frozen=True)
class StackedConv:
    """A bank's experts as one stacked conv, what the gathered and merged kernels read.

    Attributes:
        weight: (E, C_out, C_in / groups, kh, kw); the geometry is the bank's. With ``up``, the
            experts' first factor: (E, r, C_in, kh, kw).
        bias: (E, C_out) or None.
        groups: Conv groups (C_in for depthwise).
        post: Per-position ops after each expert's conv (an :class:`~convmoe.experts.ExpertPostOps`).
        up: None, or a factored (low-rank) stack: expert e is the 1x1 conv ``up[e]`` (C_out, r) after
            the conv ``weight[e]`` (r output channels), i.e. the conv ``up[e] @ weight[e]``.

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
    up: Tensor | None = None

    def full_weight(self) -> Tensor:
        """Every expert's whole conv weight, (E, C_out, C_in / groups, kh, kw) (factors multiplied out)."""
        if self.up is None:
            return self.weight
        return torch.einsum("eor,erikl->eoikl", self.up, self.weight)

    def column_weight(self, channels_last: bool = False) -> Tensor:
        """Every expert's weight as a matrix over receptive-field columns, (E, C_in * kh * kw, C_out).

        Rows follow ``F.unfold``'s (C_in, kh, kw) order, or (kh, kw, C_in) with ``channels_last``
        (columns gathered from a channels-last map). Needs ``groups == 1``.
        """
        weight = self.weight if not channels_last else self.weight.permute(0, 1, 3, 4, 2)
        return weight.reshape(weight.shape[0], weight.shape[1], -1).transpose(1, 2)


_CAPABILITY_METHODS = {"gathered_columns": "stacked_conv", "dense_forward": "forward_all", "shared_base": "base_conv"}


def _mix(stacked: Tensor, weights: Tensor) -> Tensor:
    """``sum_e weights[e] * stacked[e]``; identical experts (upcycled, untrained) give themselves bit for bit."""
    if bool((stacked == stacked[:1]).all()) and abs(float(weights.sum()) - 1.0) < 1e-6:
        return stacked[0].clone()
    return torch.einsum("e,e...->...", weights.to(stacked.dtype), stacked)


class ExpertBank(nn.Module, abc.ABC):
    """Base of every expert bank: E experts stored together, run on the segments a dispatcher sorts.

    Required: ``forward_segments`` (abstract), and ``in_channels``, ``out_channels``, ``num_experts``
    and ``geometry`` given to ``__init__``. Optional, declared in ``capabilities`` (default: none):
    ``stacked_conv()`` for ``gathered_columns`` (and the merged path and ``mixed_conv`` when
    ``linear``), ``forward_all`` for ``dense_forward``, ``base_conv()`` for ``shared_base``. A class
    attribute ``capabilities`` that declares a capability without its method fails at class
    creation; a bank without ``forward_segments`` cannot be instantiated.

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

    def base_conv(self) -> tuple[Tensor, Tensor | None]:
        """The shared conv's (weight (C_out, C_in, kh, kw), bias (C_out,) or None); required when
        ``capabilities.shared_base``."""
        raise NotImplementedError(f"{type(self).__name__} has no shared base conv (capabilities.shared_base is False).")

    def forward_base(self, x_pad: Tensor, padding: tuple[int, int] = (0, 0)) -> Tensor:
        """The shared base conv on the whole padded map, (B, C_out, H_out, W_out); ``padding``: zeros the
        conv adds itself (for an unpadded map, see ``ConvGeometry.conv_padding``)."""
        weight, bias = self.base_conv()
        g = self.geometry
        return F.conv2d(x_pad, weight, bias, stride=g.stride, padding=padding, dilation=g.dilation,
                        groups=self.in_channels // weight.shape[1])

    def mixed_conv(self, weights: Tensor) -> tuple[Tensor, Tensor | None]:
        """The one conv (weight, bias) that computes ``sum_e weights[e] * expert_e`` plus the shared base.

        What ``convmoe.unpatch`` folds a block into. Needs ``linear`` and ``gathered_columns``.

        Args:
            weights: Mixing weight of every expert, (E,).

        Example:
            >>> from convmoe.experts import ConvExperts
            >>> weight, bias = ConvExperts(2, 3, 2, ConvGeometry.create(3)).mixed_conv(torch.tensor([0.5, 0.5]))
            >>> weight.shape, bias.shape
            (torch.Size([3, 2, 3, 3]), torch.Size([3]))
        """
        if not (self.capabilities.linear and self.capabilities.gathered_columns):
            raise TypeError(f"{type(self).__name__} experts are not a linear stacked conv ({self.capabilities}); "
                            "a mixture of them is not one conv.")
        conv = self.stacked_conv()
        weight = _mix(conv.full_weight(), weights)
        bias = None if conv.bias is None else _mix(conv.bias, weights)
        if self.capabilities.shared_base:
            base_weight, base_bias = self.base_conv()
            weight = base_weight + weight
            if base_bias is not None:
                bias = base_bias.clone() if bias is None else base_bias + bias
        return weight, bias

    def expert_macs_per_position(self) -> float:
        """Multiply-adds of one expert per output position (what routing one token to it costs).

        Default: the weights of 4-D and larger parameters over E (one conv per expert).
        """
        return sum(p.numel() for p in self.parameters() if p.dim() >= 4) / self.num_experts

    def base_macs_per_position(self) -> float:
        """Multiply-adds of the shared base conv per output position (0 without ``shared_base``)."""
        if not self.capabilities.shared_base:
            return 0.0
        return float(self.base_conv()[0].numel())

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ExpertBank:
        """``nn.Module._apply`` that lets ``.to(memory_format=...)`` reach stacked 5-D weights.

        ``Tensor.to(memory_format=torch.channels_last)`` only takes 4-D tensors (and sees a 5-D tensor
        as already contiguous): conversions are applied to the (E * C_out, C_in, kh, kw) view, so each
        expert's weight gets the layout of the ``nn.Conv2d`` weight it replaces, and back.
        """

        def convert(t: Tensor) -> Tensor:
            if t.dim() != 5:
                return fn(t)
            try:
                return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])
            except RuntimeError:  # a conversion only 5-D tensors take (torch.channels_last_3d)
                return fn(t)

        clear_derived_weights(self)  # built from the tensors being replaced
        return super()._apply(convert, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return without_derived_weights(super().__getstate__())  # rebuilt on demand, never pickled

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
