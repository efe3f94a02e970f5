"""The sparse dispatcher: only the routed tokens reach each expert; its path is chosen here, from capabilities."""

from __future__ import annotations

import difflib
import warnings

from torch import Tensor, nn

from convmoe.dispatch.assignments import routed
from convmoe.dispatch.base import add_shared_base
from convmoe.dispatch.deltas import deltas_are_cheap, mixed_deltas
from convmoe.dispatch.dense import position_weights
from convmoe.dispatch.formats import channels_innermost
from convmoe.dispatch.gathered import run_gathered
from convmoe.dispatch.merged import SMALL_MAP_POSITIONS, merged_routing
from convmoe.dispatch.regions import run_regions
from convmoe.dispatch.tiles import TileLayout
from convmoe.experts.base import ExpertBank
from convmoe.types import Routing, Tokens

PATHS = ("auto", "gathered", "regions", "merged", "deltas")
DEPRECATED_PATHS = {"pixels": "gathered", "columns": "gathered", "mixed": "merged"}
"""Old path names, still accepted (with a ``DeprecationWarning``): saved configs may carry them."""
MERGED_MAX_WEIGHTS = 8_000_000
"""Default ``SparseDispatcher.merged_max_weights`` (see ``benchmarks/bench_image_paths.py``)."""


def resolve_path(path: str) -> str:
    """The current name of sparse path ``path``; an old name warns, an unknown one raises.

    Example:
        >>> resolve_path("regions")
        'regions'
    """
    if path in DEPRECATED_PATHS:
        warnings.warn(f"sparse path {path!r} is deprecated; use {DEPRECATED_PATHS[path]!r}.", DeprecationWarning,
                      stacklevel=3)
        return DEPRECATED_PATHS[path]
    if path not in PATHS:
        hint = difflib.get_close_matches(path, [*PATHS, *DEPRECATED_PATHS], n=1)
        suggestion = f" (did you mean {DEPRECATED_PATHS.get(hint[0], hint[0])!r}?)" if hint else ""
        raise ValueError(f"unknown sparse dispatch path {path!r}; available: {', '.join(PATHS)}{suggestion}")
    return path


def _token_positions(tokens: Tokens) -> int:
    """Output positions of the largest token (the whole map for image tokens)."""
    tile = TileLayout.from_tokens(tokens).tile
    return tile[0] * tile[1]


class SparseDispatcher(nn.Module):
    """Gather per expert, compute, scatter-add with the combine weights; cost tracks the active experts.

    Paths (``path="auto"`` picks the fastest correct one from the experts' capabilities):

    - ``"merged"``: one token per image and ``linear`` stacked-conv experts: each image's experts
      merged into one conv, one grouped conv for the batch (CondConv; :mod:`convmoe.dispatch.merged`).
    - ``"gathered"``: ``gathered_columns`` experts (stacked convs that see a halo): the receptive
      field of every routed output position becomes a row (gathered from the channels-last input),
      and the experts run as matrix products over their rows: one ``grouped_mm`` on GPU (no host
      sync), a cache-sized chunk at a time on CPU (:mod:`convmoe.dispatch.gathered`).
    - ``"regions"``: any bank: crop each routed token's region (with its halo unless the bank
      ``sees_no_halo``), one ``forward_segments`` call (:mod:`convmoe.dispatch.regions`).
    - ``"deltas"``: factored (low-rank) experts: every expert's rank-r ``down`` on every position,
      weighted and mixed before one product with the stacked ``up`` (:mod:`convmoe.dispatch.deltas`):
      no gather or scatter, shapes independent of the routing.

    ``"auto"`` uses ``"merged"`` where it applies and the batch's merged weights (B x C_out x
    C_in / groups x kh x kw) are at most ``merged_max_weights`` (on CPU, for full-rank experts, times
    (positions / ``SMALL_MAP_POSITIONS``)^2 on maps of fewer positions, unless one image has one expert or
    is channels-last),
    ``"deltas"`` for factored experts whose E * r ``down`` channels are at most C_in + C_out (measured on CPU
    at C=64 and 256, E=8, r=8: 0.6-0.85x the gathered path's time), ``"gathered"`` for per-pixel tokens
    and, with ungrouped experts, for tokens of at most ``gathered_max_positions`` output positions (small
    patches) or (on CPU) of at most ``SMALL_MAP_POSITIONS`` that are whole images or feed 1x1 experts, and
    ``"regions"`` otherwise: a conv on a large tile beats gathering its receptive fields
    (measured on CPU: patch:2 3.1x vs 6.2x a dense conv, patch:4 6.9x vs 3.5x). The old names
    ``"mixed"`` (now ``"merged"``), ``"pixels"`` and ``"columns"`` (now ``"gathered"``) still work,
    with a ``DeprecationWarning``.

    Args:
        path: Force a path; an impossible choice raises ``ValueError``.
        gathered_max_positions: Largest token (in output positions) ``"auto"`` sends to ``"gathered"``.
        merged_max_weights: Largest batch of merged weights ``"auto"`` builds; above it per-expert
            sub-batches (``"regions"``) are faster (measured on CPU, 3x3 convs, E=8, top-2: merged
            wins at 1.5-2.4x the dense conv up to C=256 at batch 8, 4.7M weights; at C=256 and batch
            32, 19M weights, sub-batches take 2.8x and merging 3.0x; ``benchmarks/bench_image_paths.py``).
        columns_max_positions: Deprecated name of ``gathered_max_positions``.

    Example:
        >>> import torch
        >>> from convmoe import MoEConv2d, MoEConfig
        >>> block = MoEConv2d(4, 4, 3, padding=1, config=MoEConfig(tokens="grid:2x2", dispatcher="sparse"))
        >>> block(torch.randn(1, 4, 6, 6)).shape
        torch.Size([1, 4, 6, 6])
        >>> block.dispatcher.choose_path(block.tokens.split(torch.randn(1, 4, 6, 6)), block.experts)
        'regions'
    """

    adds_shared_base = True
    pads_itself = True

    def __init__(self, path: str = "auto", gathered_max_positions: int = 4,
                 columns_max_positions: int | None = None, merged_max_weights: int = MERGED_MAX_WEIGHTS) -> None:
        super().__init__()
        self.path = resolve_path(path)
        self.merged_max_weights = merged_max_weights
        if columns_max_positions is not None:
            warnings.warn("columns_max_positions is deprecated; use gathered_max_positions.", DeprecationWarning,
                          stacklevel=2)
            gathered_max_positions = columns_max_positions
        self.gathered_max_positions = gathered_max_positions

    def choose_path(self, tokens: Tokens, experts: ExpertBank, slots: int | None = None) -> str:
        """The path used for these tokens and experts: the one place a path is chosen.

        Args:
            tokens: The split input.
            experts: The expert bank.
            slots: Experts per token of the routing (``Routing.slots``; None: unknown). One image with one
                expert per token merges at any map size: it runs that expert's own conv. So does one
                channels-last image with any number of experts (on CPU).

        Raises:
            ValueError: The forced path cannot run these tokens or experts.
        """
        capabilities = experts.capabilities
        gathered_ok = capabilities.gathered_columns and not capabilities.sees_no_halo
        merged_ok = tokens.num_tokens == 1 and gathered_ok and capabilities.linear
        conv = experts.stacked_conv() if gathered_ok else None
        if self.path == "merged" and not merged_ok:
            raise ValueError("sparse path 'merged' needs one token per image ('image' tokens) and linear conv experts "
                             "(no expert norm or activation); use path='auto'.")
        if self.path == "gathered" and not gathered_ok:
            raise ValueError(f"sparse path 'gathered' needs conv experts (capabilities.gathered_columns, a halo), "
                             f"{type(experts).__name__} has {capabilities}; use path='auto' or 'regions'.")
        if self.path == "deltas" and not (conv is not None and conv.up is not None):
            raise ValueError(f"sparse path 'deltas' needs factored experts (experts='lowrank'), "
                             f"{type(experts).__name__} are not; use path='auto'.")
        if self.path != "auto":
            return self.path
        batch, on_cpu = tokens.source.shape[0], tokens.source.device.type == "cpu"  # small-map rules: measured on CPU
        one_image_merges = batch == 1 and (slots == 1 or channels_innermost(tokens.source))
        if merged_ok and batch * experts.out_channels * conv.weight[0, 0].numel() <= (
                self._merged_budget(tokens, scale_small_maps=on_cpu and conv.up is None and not one_image_merges)):
            return "merged"
        if conv is not None and deltas_are_cheap(experts, conv):
            return "deltas"
        if gathered_ok and tokens.is_pixel:
            return "gathered"
        whole_maps_or_pointwise = on_cpu and (tokens.num_tokens == 1 or (
            conv is not None and conv.weight.shape[-2:] == (1, 1)))
        if conv is not None and conv.groups == 1 and _token_positions(tokens) <= (
                SMALL_MAP_POSITIONS if whole_maps_or_pointwise else self.gathered_max_positions):
            return "gathered"
        return "regions"

    def _merged_budget(self, tokens: Tokens, scale_small_maps: bool) -> float:
        """Most merged weights ``"auto"`` builds for a batch: ``merged_max_weights``, scaled by
        (positions / SMALL_MAP_POSITIONS)^2 on smaller maps where ``scale_small_maps`` (full-rank experts on CPU;
        factored ones keep their rank on small maps instead of merging weights)."""
        budget = getattr(self, "merged_max_weights", MERGED_MAX_WEIGHTS)  # (pickled before the setting: default)
        return budget * min(1.0, _token_positions(tokens) / SMALL_MAP_POSITIONS) ** 2 if scale_small_maps else budget

    def forward(self, x_pad: Tensor, tokens: Tokens, routing: Routing, experts: ExpertBank,
                out_size: tuple[int, int], padded: bool = True) -> Tensor:
        """``padded=False``: ``x_pad`` is the unpadded input; the whole-map paths (merged, deltas) hand
        zero padding to their convs, the others pad it first."""
        path = self.choose_path(tokens, experts, routing.slots)
        if x_pad.is_meta and path in ("gathered", "regions"):  # their grouping reads the routing's values
            return x_pad.new_empty((x_pad.shape[0], experts.out_channels, *out_size))  # shape inference only
        padding = (0, 0)
        if not padded:
            whole_map = experts.geometry.conv_padding(*x_pad.shape[-2:]) if path in ("merged", "deltas") else None
            x_pad, padding = (experts.geometry.pad(x_pad), padding) if whole_map is None else (x_pad, whole_map)
        if path == "merged":  # folds a shared base into each image's conv
            return merged_routing(experts, x_pad, routing, padding)
        if path == "deltas":
            weight_map = position_weights(tokens, routing, out_size)
            return mixed_deltas(experts, x_pad, weight_map, with_base=True, padding=padding)
        if path == "gathered":
            return add_shared_base(experts, x_pad, run_gathered(x_pad, tokens, routed(routing), experts, out_size))
        return add_shared_base(experts, x_pad, run_regions(x_pad, tokens, routed(routing), experts, out_size))

    def extra_repr(self) -> str:
        return f"path={self.path}"
