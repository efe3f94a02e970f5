"""Tokenizers: how an output feature map is cut into routed regions."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOKEN_SPECS

from convmoe import TOKENS, MoEConv2d, create_tokens
from convmoe.tokens import GridTokens, ImageTokens, PatchTokens, PixelTokens
from convmoe.tokens.base import Tokenizer

SIZES = [(9, 9), (9, 7), (4, 11), (1, 1)]


def expected_grid(spec: str, height: int, width: int) -> tuple[int, int]:
    if spec == "pixel":
        return height, width
    if spec == "image":
        return 1, 1
    name, _, arg = spec.partition(":")
    if name == "patch":
        size = int(arg)
        return math.ceil(height / size), math.ceil(width / size)
    rows, cols = (int(v) for v in arg.split("x"))
    return rows, cols


@pytest.mark.parametrize(("spec", "height", "width"), [
    (spec, h, w) for spec in TOKEN_SPECS for h, w in SIZES
    if h >= expected_grid(spec, h, w)[0] and w >= expected_grid(spec, h, w)[1]  # else an error, tested below
])
def test_tokens_partition_every_position_exactly_once(spec: str, height: int, width: int) -> None:
    rows, cols = expected_grid(spec, height, width)
    tokens = create_tokens(spec).split(torch.randn(2, 3, height, width))

    assert tokens.grid == (rows, cols)
    assert tokens.num_tokens == rows * cols
    assert tokens.row_edges[0] == 0
    assert tokens.row_edges[-1] == height
    assert tokens.col_edges[0] == 0
    assert tokens.col_edges[-1] == width
    assert all(b > a for a, b in zip(tokens.row_edges, tokens.row_edges[1:], strict=False))
    assert all(b > a for a, b in zip(tokens.col_edges, tokens.col_edges[1:], strict=False))
    # token_map agrees with the edges, position by position
    token_map = tokens.token_map.reshape(height, width)
    for a in range(rows):
        for b in range(cols):
            region = token_map[tokens.row_edges[a]:tokens.row_edges[a + 1], tokens.col_edges[b]:tokens.col_edges[b + 1]]
            assert (region == a * cols + b).all()
    counts = torch.bincount(tokens.token_map, minlength=tokens.num_tokens).float()
    torch.testing.assert_close(tokens.counts(), counts)
    assert tokens.is_pixel == (tokens.num_tokens == height * width)
    assert tokens.group_over_batch == (spec == "image")
    assert tokens.kind == spec


def test_grid_splits_into_near_equal_parts_without_cropping() -> None:
    tokens = GridTokens(3, 4).split(torch.randn(1, 2, 10, 9))
    assert tokens.row_edges == (0, 3, 6, 10)
    assert tokens.col_edges == (0, 2, 4, 6, 9)
    heights = [b - a for a, b in zip(tokens.row_edges, tokens.row_edges[1:], strict=False)]
    assert max(heights) - min(heights) <= 1


def test_patch_keeps_the_remainder_and_small_maps_are_one_token() -> None:
    assert PatchTokens(4).split(torch.randn(1, 2, 9, 8)).row_edges == (0, 4, 8, 9)
    small = PatchTokens(8).split(torch.randn(1, 2, 5, 3))
    assert small.num_tokens == 1
    assert small.row_edges == (0, 5)
    assert small.col_edges == (0, 3)


@pytest.mark.parametrize("spec", TOKEN_SPECS)
def test_token_mean_and_amax_pool_each_region(spec: str) -> None:
    source = torch.randn(2, 3, 9, 7)
    tokens = create_tokens(spec).split(source)
    mean, amax = tokens.mean(), tokens.amax()
    assert mean.shape == amax.shape == (2, tokens.num_tokens, 3)
    rows, cols = tokens.grid
    for a in range(rows):
        for b in range(cols):
            region = source[:, :, tokens.row_edges[a]:tokens.row_edges[a + 1], tokens.col_edges[b]:tokens.col_edges[b + 1]]
            n = a * cols + b
            torch.testing.assert_close(mean[:, n], region.mean(dim=(-2, -1)))
            torch.testing.assert_close(amax[:, n], region.amax(dim=(-2, -1)))


def test_token_centres_are_normalised_region_centres() -> None:
    tokens = GridTokens(2, 2).split(torch.randn(1, 1, 4, 8))
    expected = torch.tensor([[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]])
    torch.testing.assert_close(tokens.centres(), expected)


@pytest.mark.parametrize(("spec", "cls", "expected_spec"), [
    ("pixel", PixelTokens, "pixel"),
    ("grid:3x3", GridTokens, "grid:3x3"),
    ("grid:3", GridTokens, "grid:3x3"),
    ("grid:2X4", GridTokens, "grid:2x4"),
    ("patch:4", PatchTokens, "patch:4"),
    ("image", ImageTokens, "image"),
])
def test_create_tokens_parses_specs(spec: str, cls: type, expected_spec: str) -> None:
    tokenizer = create_tokens(spec)
    assert isinstance(tokenizer, cls)
    assert repr(tokenizer) == expected_spec


def test_create_tokens_accepts_class_and_instance() -> None:
    instance = GridTokens(2, 2)
    assert create_tokens(instance) is instance
    assert isinstance(create_tokens(ImageTokens), ImageTokens)


@pytest.mark.parametrize(("spec", "match"), [
    ("grdi:3x3", r"unknown tokens 'grdi'; available: grid, image, patch, pixel \(did you mean 'grid'\?\)"),
    ("pixels", r"unknown tokens 'pixels'.*did you mean 'pixel'"),
    ("grid:axb", r"cannot read tokens spec 'grid:axb'.*'a' is not an integer"),
    ("patch:big", r"cannot read tokens spec 'patch:big'"),
    ("patch:0", r"patch tokens need a size >= 1, got 0"),
    ("grid:0x2", r"grid tokens need at least 1x1 patches, got 0x2"),
])
def test_bad_token_specs_raise(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_tokens(spec)


def test_grid_larger_than_map_raises() -> None:
    with pytest.raises(ValueError, match=r"tokens 'grid:3x3' needs a feature map of at least 3x3, got 2x5; "
                                         r"use a smaller grid or 'pixel'"):
        GridTokens(3, 3).split(torch.randn(1, 2, 2, 5))


def test_grid_larger_than_output_raises_in_the_block() -> None:
    block = MoEConv2d(4, 4, 3, stride=2, padding=1, num_experts=2, tokens="grid:3x3")
    with pytest.raises(ValueError, match=r"tokens 'grid:3x3' needs a feature map of at least 3x3, got 2x2"):
        block(torch.randn(1, 4, 4, 4))


def test_custom_tokenizer_subclass_splits() -> None:
    class Halves(Tokenizer):
        spec = "halves"

        def edges(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
            return (0, height // 2, height), (0, width)

    tokens = Halves().split(torch.randn(1, 2, 5, 3))
    assert tokens.num_tokens == 2
    assert tokens.token_map.tolist() == [0] * 6 + [1] * 9


def test_tokens_registry_holds_the_built_ins() -> None:
    assert TOKENS.names() == ["grid", "image", "patch", "pixel"]
