"""The merged path: mix each image's expert weights into one conv (CondConv), one grouped conv for the batch.

Exact for linear experts only: sum_e w_e (W_e * x + b_e) = (sum_e w_e W_e) * x + sum_e w_e b_e
(Yang et al., 2019, CondConv, arXiv:1904.04971). Applies when every image is one token. A shared
base conv (low-rank experts' W0) is folded in: each image's conv is ``W0 + sum_e w_e dW_e``.
Factored (low-rank) experts are multiplied out when that is cheaper than running them factored
(large maps); otherwise (small maps) they keep their rank: W0 and every expert's ``down`` on the
map, then each image's weighted ``up`` (:func:`~convmoe.dispatch.deltas.mixed_deltas`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.dispatch.deltas import mixed_deltas
from convmoe.dispatch.formats import in_format_of
from convmoe.experts.base import ExpertBank, StackedConv
from convmoe.geometry import ConvGeometry
from convmoe.recording import reads_on_host
from convmoe.types import Routing

SMALL_MAP_POSITIONS = 64
"""Output positions per image below which merging experts' weights stops paying on CPU: the merged-weights
budget shrinks by (positions / 64)^2 (``SparseDispatcher``), except for one image with one expert per token
(it runs that expert's own conv) and one channels-last image (at batch 1, top-2, channels-last, merging was the
fastest path or within 1% for every 1x1 shape and the 7x7 map of 3x3 convs, on 1 and 2 threads, and half the
gathered path's time for 3x3 convs on a 3x3 map; in NCHW the slower dense-layout conv makes gathering win
there). Up to it, ``"auto"`` also gathers the tokens of whole maps and of 1x1 experts
(which read no halo: each position is copied once) rather than running a conv per expert on a few positions.
On 3x3 maps, merging a batch took 1.2-20x the gathered path's time; on 6x6 and 7x7 maps it won up to 2-2.5M
merged weights and lost above. Measured with ``benchmarks/bench_image_paths.py --kernel 1`` and ``--kernel 3``,
inference and ``--train``, on CPU; other devices keep the earlier rules (the full budget, gathering only up
to ``gathered_max_positions``) until measured."""


def merged_conv(experts: ExpertBank, x_pad: Tensor, weights: Tensor, padding: tuple[int, int] = (0, 0), *,
                select_used: bool | None = None) -> Tensor:
    """Each image through the weighted sum of the experts' convs (plus a shared base), (B, C_out, H_out, W_out).

    Args:
        experts: A bank whose capabilities are ``gathered_columns`` (a stacked conv) and ``linear``.
        x_pad: The padded input, (B, C_in, H_pad, W_pad).
        weights: Each image's combine weight per expert, (B, E).
        padding: Zeros the conv adds itself, when ``x_pad`` is the unpadded input
            (``ConvGeometry.conv_padding``).
        select_used: Read on the host which experts some image uses and mix only those (one image with one
            expert: that expert's own conv). None: in eager mode on CPU (:func:`~convmoe.recording.reads_on_host`);
            a recording must not read values, and an accelerator would wait. FLOP counting passes it (it traces).

    Example:
        >>> from convmoe.experts import ConvExperts
        >>> from convmoe.geometry import ConvGeometry
        >>> experts = ConvExperts(4, 6, num_experts=3, geometry=ConvGeometry.create(3))
        >>> x_pad, weights = torch.randn(2, 4, 5, 5), torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]])
        >>> expected = (experts.forward_all(x_pad) * weights[:, :, None, None, None]).sum(1)
        >>> torch.allclose(merged_conv(experts, x_pad, weights), expected, atol=1e-5)
        True
    """
    conv, g = experts.stacked_conv(), experts.geometry
    B = x_pad.shape[0]
    out_h, out_w = g.padded_output_size(x_pad.shape[-2] + 2 * padding[0], x_pad.shape[-1] + 2 * padding[1])
    if conv.up is not None and not _fold_factors(conv.up, conv.weight, B, out_h * out_w):
        # A small map: keep the rank. Every expert's r channels and W0 on the map, then each image's weights
        # on its r-channel groups inside the product with ``up`` (the deltas path, one weight per image).
        weight_map = weights.to(conv.up.dtype)[:, :, None, None].expand(-1, -1, out_h, out_w)
        return mixed_deltas(experts, x_pad, weight_map, with_base=True, padding=padding)
    weights = weights.to(conv.weight.dtype)
    expert_weight, expert_bias, expert_up = conv.weight, conv.bias, conv.up
    # Eager CPU: read only the experts some sample uses (k of E for a small batch). Not while compiling,
    # exporting or tracing: the selection has a data-dependent shape.
    if reads_on_host(x_pad) if select_used is None else select_used:
        used = (weights != 0).any(dim=0).nonzero().flatten()
        if B == 1 and used.numel() == 1 and expert_up is None and not experts.capabilities.shared_base:
            expert = int(used[0])
            return _one_expert_on_one_image(conv, g, x_pad, expert, weights[0, expert], padding)
        if used.numel() < experts.num_experts:  # index_select: indexing (W[used]) was ~6x slower on CPU
            weights, expert_weight = weights[:, used], expert_weight.index_select(0, used)
            expert_bias = None if expert_bias is None else expert_bias.index_select(0, used)
            expert_up = None if expert_up is None else expert_up.index_select(0, used)
    base = experts.base_conv() if experts.capabilities.shared_base else None
    stacked = expert_weight if expert_up is None else torch.einsum("eor,erikl->eoikl", expert_up, expert_weight)
    mixed = torch.einsum("be,eoikl->boikl", weights, stacked)
    bias = None if expert_bias is None else weights @ expert_bias  # (B, C_out)
    if base is not None:
        mixed = mixed + base[0]
        if base[1] is not None:
            bias = base[1].expand(B, -1) if bias is None else bias + base[1]
    # Batch 1 runs on x_pad itself: reshaping gives a new batch stride, and a CPU conv then reads a channels-last
    # map as NCHW and copies it (4x the conv's time on a 3x3 map).
    y = F.conv2d(x_pad if B == 1 else x_pad.reshape(1, -1, *x_pad.shape[2:]), mixed.flatten(0, 1),
                 None if bias is None else bias.flatten(), stride=g.stride, padding=padding, dilation=g.dilation,
                 groups=conv.groups * B)
    return in_format_of(y.reshape(B, experts.out_channels, *y.shape[2:]), x_pad)


def merged_routing(experts: ExpertBank, x_pad: Tensor, routing: Routing, padding: tuple[int, int] = (0, 0)) -> Tensor:
    """:func:`merged_conv` with each image's weights read from ``routing`` (image tokens).

    One image with one expert per token, on eager CPU, goes straight to that expert's conv: the (B, E) weights
    and the scan for used experts cost as much as a small conv (about 30 us a block at batch 1).
    """
    if x_pad.shape[0] == 1 and routing.slots == 1 and not experts.capabilities.shared_base and reads_on_host(x_pad):
        conv = experts.stacked_conv()
        if conv.up is None:
            weight = routing.combine_weight[0, 0, 0] * routing.slot_mask[0, 0, 0].to(routing.combine_weight.dtype)
            return _one_expert_on_one_image(conv, experts.geometry, x_pad, int(routing.expert_index[0, 0, 0]),
                                            weight.to(conv.weight.dtype), padding)
    return merged_conv(experts, x_pad, routing.dense_weights()[:, 0], padding)


def _one_expert_on_one_image(conv: StackedConv, geometry: ConvGeometry, x_pad: Tensor, expert: int, weight: Tensor,
                             padding: tuple[int, int]) -> Tensor:
    """One image with one expert: that expert's own conv, its output scaled by the combine weight; no weight
    is copied or mixed.

    At batch 1 on a 3x3 map (1x1 conv, 192 -> 1152 channels, top-1, one thread) the block took 294 us this way
    against 945 us mixing and 846 us gathered (the dense conv: 185 us). With two experts, their two convs
    were slower than gathering on small maps and, in training, than mixing; those keep the other paths.
    """
    y = F.conv2d(x_pad, conv.weight[expert], None if conv.bias is None else conv.bias[expert],
                 stride=geometry.stride, padding=padding, dilation=geometry.dilation, groups=conv.groups)
    return in_format_of(y * weight, x_pad)


def _fold_factors(up: Tensor, down: Tensor, batch: int, positions: int) -> bool:
    """Whether to multiply factored experts out (C_out * r * K multiply-adds per used expert, once) and run
    one conv, rather than run them factored (B * positions * r * (K + C_out) per expert, in the base conv).

    The factored side then runs all E experts, with no selection: where it wins (maps of a few
    positions) that costs less than the selection's operators."""
    c_out, k = up.shape[1], down[0, 0].numel()
    return c_out * k <= batch * positions * (k + c_out)
