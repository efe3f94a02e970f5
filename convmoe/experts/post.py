"""Per-position operations applied after an expert's convolution (norm, activation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}
NORMS = ("layer",)


class ExpertPostOps(nn.Module):
    """An optional channel LayerNorm (per-expert affine) and activation after each expert's conv.

    Both act on each output position alone, so they commute with the spatial gather of any
    dispatcher and keep dense and sparse dispatch exact.

    Args:
        num_experts: E.
        channels: C_out.
        norm: None or "layer".
        act: None, "relu", "silu" or "gelu".

    Example:
        >>> post = ExpertPostOps(2, 4, act="relu")
        >>> post(torch.tensor([-1.0, 2.0, -3.0, 4.0]).view(1, 4, 1, 1), 0).flatten()
        tensor([0., 2., 0., 4.])
    """

    def __init__(self, num_experts: int, channels: int, norm: str | None = None, act: str | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if norm is not None and norm not in NORMS:
            raise ValueError(f"unknown expert norm {norm!r}; available: {', '.join(NORMS)} (or None).")
        if act is not None and act not in ACTIVATIONS:
            raise ValueError(f"unknown expert activation {act!r}; available: {', '.join(sorted(ACTIVATIONS))} (or None).")
        self.norm, self.act = norm, act
        if norm == "layer":
            self.norm_weight = nn.Parameter(torch.ones(num_experts, channels, device=device, dtype=dtype))
            self.norm_bias = nn.Parameter(torch.zeros(num_experts, channels, device=device, dtype=dtype))

    @property
    def is_identity(self) -> bool:
        return self.norm is None and self.act is None

    def forward(self, y: Tensor, expert: int | None = None) -> Tensor:
        """Apply expert ``expert``'s ops to (M, C, h, w), or every expert's to (B, E, C, h, w) when None."""
        if self.norm == "layer":
            channel_dim = 1 if expert is not None else 2
            mean = y.mean(dim=channel_dim, keepdim=True)
            var = y.var(dim=channel_dim, keepdim=True, unbiased=False)
            y = (y - mean) * torch.rsqrt(var + 1e-5)
            if expert is not None:
                y = y * self.norm_weight[expert, :, None, None] + self.norm_bias[expert, :, None, None]
            else:
                y = y * self.norm_weight[None, :, :, None, None] + self.norm_bias[None, :, :, None, None]
        if self.act is not None:
            y = ACTIVATIONS[self.act](y)
        return y

    def forward_rows(self, y: Tensor, expert: int | Tensor) -> Tensor:
        """Apply the ops to output rows (M, C): of one ``expert``, or of rows sorted by expert with
        ``expert`` the (E,) int64 rows of each expert.

        Example:
            >>> post = ExpertPostOps(2, 2, act="relu")
            >>> post.forward_rows(torch.tensor([[-1.0, 1.0], [2.0, -2.0]]), torch.tensor([1, 1]))
            tensor([[0., 1.],
                    [2., 0.]])
        """
        if self.norm == "layer":
            y = F.layer_norm(y, (y.shape[1],), eps=1e-5)
            if isinstance(expert, Tensor):
                weight = self.norm_weight.to(y.dtype).repeat_interleave(expert, dim=0, output_size=y.shape[0])
                bias = self.norm_bias.to(y.dtype).repeat_interleave(expert, dim=0, output_size=y.shape[0])
            else:
                weight, bias = self.norm_weight[expert].to(y.dtype), self.norm_bias[expert].to(y.dtype)
            y = torch.addcmul(bias, y, weight)
        if self.act is not None:
            y = ACTIVATIONS[self.act](y)
        return y

    def extra_repr(self) -> str:
        return f"norm={self.norm}, act={self.act}"
