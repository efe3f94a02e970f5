"""The sparse dispatcher: only the routed tokens reach each expert."""

from __future__ import annotations

from torch import Tensor, nn

from convmoe.dispatch.assignments import routed
from convmoe.dispatch.regions import run_pixels, run_regions
from convmoe.types import Routing, Tokens

PATHS = ("auto", "pixels", "regions", "mixed")


class SparseDispatcher(nn.Module):
    """Gather per expert, compute, scatter-add with the combine weights; cost tracks the active experts.

    Paths (``path="auto"`` picks the fastest correct one):

    - ``"mixed"``: one token per image and linear experts: mix each sample's expert weights and run
      one grouped conv (CondConv).
    - ``"pixels"``: per-pixel tokens and conv experts: unfold receptive fields once, one matrix
      product per expert over its routed positions.
    - ``"regions"``: any tokens: gather each routed region with its halo, one conv per expert over
      its stacked regions.

    Args:
        path: Force a path; an impossible choice raises ``ValueError``.

    Example:
        >>> import torch
        >>> from convmoe import MoEConv2d, MoEConfig
        >>> block = MoEConv2d(4, 4, 3, padding=1, config=MoEConfig(tokens="grid:2x2", dispatcher="sparse"))
        >>> block(torch.randn(1, 4, 6, 6)).shape
        torch.Size([1, 4, 6, 6])
    """

    def __init__(self, path: str = "auto") -> None:
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"unknown sparse dispatch path {path!r}; available: {', '.join(PATHS)}.")
        self.path = path

    def choose_path(self, tokens: Tokens, experts) -> str:
        """The path used for these tokens and experts."""
        mixed_ok = tokens.num_tokens == 1 and getattr(experts, "is_linear", False) and not experts.patch_local
        pixels_ok = tokens.is_pixel and hasattr(experts, "forward_columns") and not experts.patch_local
        if self.path == "mixed" and not mixed_ok:
            raise ValueError("sparse path 'mixed' needs one token per image ('image' tokens) and linear conv experts "
                             "(no expert norm or activation); use path='auto'.")
        if self.path == "pixels" and not pixels_ok:
            raise ValueError("sparse path 'pixels' needs 'pixel' tokens and conv experts; use path='auto'.")
        if self.path != "auto":
            return self.path
        return "mixed" if mixed_ok else "pixels" if pixels_ok else "regions"

    def forward(self, x_pad: Tensor, tokens: Tokens, routing: Routing, experts, out_size: tuple[int, int]) -> Tensor:
        path = self.choose_path(tokens, experts)
        if path == "mixed":
            return experts.forward_mixed(x_pad, routing.dense_weights()[:, 0])
        if path == "pixels":
            return run_pixels(x_pad, routed(routing), experts, out_size)
        return run_regions(x_pad, tokens, routed(routing), experts, out_size)

    def extra_repr(self) -> str:
        return f"path={self.path}"
