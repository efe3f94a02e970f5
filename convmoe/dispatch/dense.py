"""The reference dispatcher: every expert on every token, combined by the routing weights."""

from __future__ import annotations

from torch import Tensor, nn

from convmoe.dispatch.assignments import every_pair
from convmoe.dispatch.base import add_shared_base
from convmoe.dispatch.deltas import is_factored, mixed_deltas
from convmoe.dispatch.regions import run_regions
from convmoe.experts.base import ExpertBank
from convmoe.types import Routing, Tokens


class DenseDispatcher(nn.Module):
    """Compute all E experts everywhere and weight them: simple, obviously correct, E/k times the work.

    A bank with ``capabilities.dense_forward`` (conv experts) runs as one conv with E * C_out output
    channels over the whole map (``forward_all``), and each output position takes the combine weights
    of its token; factored (low-rank) experts are mixed at rank r instead (:mod:`convmoe.dispatch.deltas`).
    Any other bank, and one that sees no halo, runs every expert on every region.

    Example:
        >>> import torch
        >>> from convmoe import MoEConv2d, MoEConfig
        >>> block = MoEConv2d(4, 4, 3, padding=1, config=MoEConfig(num_experts=4, dispatcher="dense"))
        >>> block(torch.randn(1, 4, 6, 6)).shape
        torch.Size([1, 4, 6, 6])
    """

    adds_shared_base = True

    def forward(self, x_pad: Tensor, tokens: Tokens, routing: Routing, experts: ExpertBank,
                out_size: tuple[int, int]) -> Tensor:
        capabilities = experts.capabilities
        if capabilities.sees_no_halo or not capabilities.dense_forward:
            return add_shared_base(experts, x_pad, run_regions(x_pad, tokens, every_pair(routing), experts, out_size))
        weight = position_weights(tokens, routing, out_size)  # (B, E, H_out, W_out)
        if is_factored(experts):  # low-rank experts: mixed at rank r, no E x C_out maps
            return mixed_deltas(experts, x_pad, weight, with_base=True)
        all_outputs = experts.forward_all(x_pad)  # (B, E, C_out, H_out, W_out)
        return add_shared_base(experts, x_pad, (all_outputs * weight[:, :, None].to(all_outputs.dtype)).sum(dim=1))


def position_weights(tokens: Tokens, routing: Routing, out_size: tuple[int, int]) -> Tensor:
    """Each output position's combine weight per expert (its token's), (B, E, H_out, W_out).

    Example:
        >>> import torch
        >>> from convmoe import MoEConv2d
        >>> block = MoEConv2d(4, 4, 1, num_experts=3, tokens="grid:2x2")
        >>> tokens = block.tokens.split(torch.randn(1, 4, 4, 4))
        >>> position_weights(tokens, block.router(tokens), (4, 4)).shape
        torch.Size([1, 3, 4, 4])
    """
    weight = routing.dense_weights()  # (B, N, E)
    if not tokens.is_pixel:  # pixel tokens are the output positions, in order
        weight = weight[:, tokens.token_map]  # (B, H_out * W_out, E)
    return weight.transpose(1, 2).reshape(weight.shape[0], weight.shape[2], *out_size)
