"""The data types between the stages: Tokens summaries."""

from __future__ import annotations

import pytest
import torch
from conftest import TOKEN_SPECS

from convmoe import create_tokens


def _scatter_mean(tokens) -> torch.Tensor:
    """The token average as a scatter-add over the token map (the implementation before issue 15)."""
    flat = tokens.source.flatten(2).to(torch.promote_types(tokens.source.dtype, torch.float32))
    B, C = flat.shape[:2]
    summed = flat.new_zeros(B, C, tokens.num_tokens).index_add_(2, tokens.token_map, flat)
    return (summed / tokens.counts().to(flat.dtype)).transpose(1, 2)


@pytest.mark.parametrize("spec", [*TOKEN_SPECS, "pixel", "image", "grid:2x5", "patch:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("batch", [0, 3])
def test_token_mean_equals_the_scatter_mean(spec: str, dtype: torch.dtype, batch: int) -> None:
    padded = torch.randn(batch, 5, 15, 13).to(dtype)
    tokens = create_tokens(spec).split(padded[..., 1:-1, 1:-1])  # a strided view, as centre sampling gives
    mean = tokens.mean()
    expected = _scatter_mean(tokens)
    assert mean.shape == expected.shape == (batch, tokens.num_tokens, 5)
    assert mean.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)
