"""The data passed between the stages of an MoE block.

x (B, C_in, H, W)
 ├─ tokens.split(x)          -> Tokens     which output regions are routed as one unit
 ├─ router(tokens)           -> Routing    logits (float32), probs, expert_index / combine_weight (B, N, k)
 ├─ dispatcher(...)          -> y          dense (reference) or sparse
 └─ aux losses and statistics on the side: AuxOutput, RoutingStats
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from convmoe.caching import layout_cache


@dataclass(frozen=True)
class Tokens:
    """A partition of the output feature map into routed regions (tokens).

    Token ``n = a * grid[1] + b`` covers output rows ``row_edges[a]:row_edges[a + 1]`` and columns
    ``col_edges[b]:col_edges[b + 1]``. ``source`` holds the input features at the centre of each
    output position's receptive field, so a token's summary is a pooling of ``source`` over its region.

    Attributes:
        kind: The tokenizer's spec, e.g. ``"grid:3x3"``.
        source: Centre-sampled input features, (B, C_in, H_out, W_out).
        row_edges: Row boundaries, (grid[0] + 1,) python ints, first 0 and last H_out.
        col_edges: Column boundaries, (grid[1] + 1,) python ints, first 0 and last W_out.
        token_map: Token id of every output position, (H_out * W_out,) int64.
        group_over_batch: Whether capacity is shared by the whole batch (one token per image) rather
            than computed per image.

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> t = create_tokens("grid:2x2").split(torch.randn(1, 4, 5, 5))
        >>> t.num_tokens, t.row_edges
        (4, (0, 2, 5))
    """

    kind: str
    source: Tensor
    row_edges: tuple[int, ...]
    col_edges: tuple[int, ...]
    token_map: Tensor
    group_over_batch: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        """Number of token rows and columns."""
        return len(self.row_edges) - 1, len(self.col_edges) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens per image, N."""
        rows, cols = self.grid
        return rows * cols

    @property
    def is_pixel(self) -> bool:
        """True when every output position is its own token."""
        return self.num_tokens == self.source.shape[-2] * self.source.shape[-1]

    def counts(self) -> Tensor:
        """Output positions per token, (N,) float32."""
        heights = torch.tensor(self.row_edges[1:]) - torch.tensor(self.row_edges[:-1])
        widths = torch.tensor(self.col_edges[1:]) - torch.tensor(self.col_edges[:-1])
        return (heights[:, None] * widths[None, :]).flatten().float().to(self.source.device)

    def mean(self) -> Tensor:
        """Average of ``source`` over each token, (B, N, C_in); float32 at least (a float16 sum overflows).

        Tokens are rectangles, so the average is separable: two small matrix products with the
        row and column averaging matrices (3x faster on CPU than a scatter-add over the token map).
        """
        B, C, H, W = self.source.shape
        dtype = torch.promote_types(self.source.dtype, torch.float32)
        source = self.source.to(dtype)
        if self.is_pixel:
            return source.flatten(2).transpose(1, 2)
        if self.num_tokens == 1:  # image tokens
            return source.mean(dim=(2, 3)).unsqueeze(1)
        if torch.jit.is_tracing():
            # FLOP counting (fvcore traces): pooling is no multiply-add of the model, and the scatter
            # form is not counted, where the two matrix products would be.
            summed = source.new_zeros(B, C, self.num_tokens).index_add_(2, self.token_map, source.flatten(2))
            return (summed / self.counts().to(dtype)).transpose(1, 2)
        rows = _averaging_matrix(self.row_edges, H, dtype, source.device)  # (H, grid rows)
        cols = _averaging_matrix(self.col_edges, W, dtype, source.device)  # (W, grid cols)
        rows_n, cols_n = rows.shape[1], cols.shape[1]
        by_col = (source @ cols).transpose(2, 3).reshape(B * C * cols_n, H)  # (B C gc, H)
        means = (by_col @ rows).reshape(B, C, cols_n, rows_n)
        return means.permute(0, 3, 2, 1).reshape(B, rows_n * cols_n, C)

    def amax(self) -> Tensor:
        """Maximum of ``source`` over each token, (B, N, C_in)."""
        B, C = self.source.shape[:2]
        flat = self.source.flatten(2)
        if self.is_pixel:
            return flat.transpose(1, 2)
        index = self.token_map.expand(B, C, -1)
        out = flat.new_full((B, C, self.num_tokens), float("-inf"))
        return out.scatter_reduce(2, index, flat, reduce="amax", include_self=True).transpose(1, 2)

    def centres(self) -> Tensor:
        """Normalised (row, col) centre of every token in [0, 1], (N, 2) float32."""
        H, W = self.source.shape[-2:]
        rows = torch.tensor(self.row_edges, dtype=torch.float32)
        cols = torch.tensor(self.col_edges, dtype=torch.float32)
        r = (rows[1:] + rows[:-1]) / (2 * H)
        c = (cols[1:] + cols[:-1]) / (2 * W)
        grid = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1)
        return grid.reshape(-1, 2).to(self.source.device)


@layout_cache(maxsize=256)
def _averaging_matrix(edges: tuple[int, ...], size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(size, len(edges) - 1): column ``a`` averages positions ``edges[a]:edges[a + 1]``; one tensor per
    layout, shared read-only."""
    with torch.inference_mode(False):  # a normal tensor even when first built under inference_mode
        bounds = torch.tensor(edges, device=device)
        position = torch.arange(size, device=device)[:, None]
        inside = (position >= bounds[:-1]) & (position < bounds[1:])
        return inside.to(dtype) / (bounds[1:] - bounds[:-1]).to(dtype)


@dataclass(frozen=True)
class Routing:
    """Which experts each token visits, and with what weight.

    ``logits`` and ``probs`` may be non-contiguous (B, N, E) views of (B, E, N) memory, the layout the
    router computes in: reshape them rather than ``view``. Token choice fills ``k = top_k`` slots per token; expert choice uses one slot per expert
    (``k = E``) and marks the slots an expert did not pick in ``slot_mask``.

    Attributes:
        logits: Router logits after noise and masking, (B, N, E) float32.
        probs: ``softmax(logits / temperature)``, (B, N, E) float32.
        expert_index: Expert of every slot, (B, N, k) int64.
        combine_weight: Weight of every slot, (B, N, k); 0 where ``slot_mask`` is False.
        slot_mask: Whether a slot is really dispatched, (B, N, k) bool.
        dropped: Tokens that reach no expert (capacity), (B, N) bool.
        capacity: Tokens each expert may take per group, or None when unlimited.
        capacity_groups: Number of groups the capacity applies to (B, or 1 for image tokens).
        expert_mask: Experts available in this pass (False: removed by expert dropout), (E,) bool.
        expert_bias: The bias of bias balancing the experts were selected with, (E,) float32, or
            None when the router keeps none (see :class:`~convmoe.routers.TokenChoiceRouter`).

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 2, 4), torch.full((1, 2, 4), 0.25),
        ...                        torch.tensor([[[0], [3]]]), torch.ones(1, 2, 1))
        >>> r.num_experts, r.slots
        (4, 1)
    """

    logits: Tensor
    probs: Tensor
    expert_index: Tensor
    combine_weight: Tensor
    slot_mask: Tensor
    dropped: Tensor
    capacity: int | None = None
    capacity_groups: int = 1
    expert_mask: Tensor | None = None
    expert_bias: Tensor | None = None

    @classmethod
    def from_top_k(cls, logits: Tensor, probs: Tensor, expert_index: Tensor, combine_weight: Tensor,
                   expert_mask: Tensor | None = None) -> Routing:
        """Routing in which every slot is dispatched and no token is dropped."""
        B, N = expert_index.shape[:2]
        return cls(
            logits=logits,
            probs=probs,
            expert_index=expert_index,
            combine_weight=combine_weight,
            slot_mask=torch.ones_like(expert_index, dtype=torch.bool),
            dropped=torch.zeros(B, N, dtype=torch.bool, device=expert_index.device),
            expert_mask=expert_mask,
        )

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return self.probs.shape[-1]

    @property
    def slots(self) -> int:
        """Slots per token, k."""
        return self.expert_index.shape[-1]

    def dense_weights(self) -> Tensor:
        """Combine weight of every (token, expert) pair, (B, N, E); zero where not dispatched."""
        weight = self.combine_weight * self.slot_mask.to(self.combine_weight.dtype)
        dense = weight.new_zeros(*weight.shape[:2], self.num_experts)
        return dense.scatter_add(2, self.expert_index, weight)

    def expert_load(self) -> Tensor:
        """Dispatched slots per expert, (E,) float32."""
        index = self.expert_index[self.slot_mask]
        return torch.bincount(index, minlength=self.num_experts).float()


@dataclass(frozen=True)
class AuxOutput:
    """Balancing losses of one forward pass.

    Attributes:
        total: Weighted sum of all terms, a differentiable scalar.
        terms: Each loss by name, unweighted.
        weights: The weight of each term.

    Example:
        >>> aux = AuxOutput(torch.tensor(0.02), {"switch": torch.tensor(2.0)}, {"switch": 0.01})
        >>> round(float(aux.total), 4)
        0.02
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutingStats:
    """Routing statistics of one MoE block's last forward pass (python floats, safe to log).

    Attributes:
        num_experts: E.
        tokens: Routed tokens in the pass (B * N).
        utilization: Share of dispatched slots per expert; sums to 1.
        utilization_entropy: Entropy of ``utilization`` divided by log(E); 1 is perfectly balanced.
        router_entropy: Mean normalised entropy of the router probabilities; 1 is uniform, 0 one-hot.
        imbalance: Max over mean expert load; 1 is perfectly balanced, E is total collapse.
        dropped_rate: Share of tokens that reached no expert.
        capacity_ratio: Dispatched slots over the total capacity, E * capacity * groups (None when
            unlimited); 1 means every expert is full.
        dead_experts: Experts that received no token.
        active_experts: Experts that received at least one token.
        medoe_expert_utilization: Share of the experts kept by expert dropout that received tokens
            (None when no dropout ran).
        medoe_expert_entropy: Normalised entropy of the load over the kept experts (None likewise).
        expert_bias: The selection bias of bias balancing per expert, as used in the pass (None when
            the router keeps none; ``MoEConfig.bias_balancing``).

    Example:
        >>> s = RoutingStats(2, 4, [0.5, 0.5], 1.0, 0.9, 1.0, 0.0, None, [], [0, 1])
        >>> s.as_dict()["imbalance"]
        1.0
    """

    num_experts: int
    tokens: int
    utilization: list[float]
    utilization_entropy: float
    router_entropy: float
    imbalance: float
    dropped_rate: float
    capacity_ratio: float | None
    dead_experts: list[int]
    active_experts: list[int]
    medoe_expert_utilization: float | None = None
    medoe_expert_entropy: float | None = None
    expert_bias: list[float] | None = None

    def as_dict(self) -> dict[str, object]:
        """The statistics as a plain dict."""
        return dict(self.__dict__)
