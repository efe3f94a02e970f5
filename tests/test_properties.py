"""Property-based tests (hypothesis) over conv geometries, input sizes and routing choices.

Contracts checked on every generated case:
- a geometry ``nn.Conv2d`` refuses is refused by MoEConv2d with a ValueError;
- an input ``nn.Conv2d`` accepts gives an output of ``nn.Conv2d``'s shape (or, when the token grid
  is larger than the output map, a ValueError naming the tokens); an input it refuses gives a
  ValueError, never an error from deep inside;
- sparse dispatch equals the dense reference, and an upcycled block equals the conv;
- a NaN or Inf in the input propagates to the outputs of the affected tokens and changes no other
  token's experts (see ``convmoe.routers.Router``).

Example counts are modest and derandomized so the suite stays fast and repeatable; run with
``--hypothesis-show-statistics`` to see the cases generated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import max_abs_diff, randomize_experts
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from convmoe import MoEConv2d

# nn.Conv2d's notice for 'same' padding with even kernels (the reference conv of the properties).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
SETTINGS = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
MAX_SIDE = 12


@dataclass(frozen=True)
class Case:
    """One generated convolution, input and routing setup."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: Any
    dilation: tuple[int, int]
    groups: int
    bias: bool
    padding_mode: str
    batch: int
    height: int
    width: int
    moe: dict[str, Any]

    def conv_kwargs(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "groups": self.groups, "bias": self.bias,
                "padding_mode": self.padding_mode}

    def conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, **self.conv_kwargs())

    def block(self, **changes: Any) -> MoEConv2d:
        return MoEConv2d(self.in_channels, self.out_channels, **self.conv_kwargs(), **{**self.moe, **changes})

    def input(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.height * 31 + self.width)
        return torch.randn(self.batch, self.in_channels, self.height, self.width, generator=g)


pairs = st.tuples(st.integers(1, 3), st.integers(1, 3))
tokens = st.one_of(
    st.just("pixel"), st.just("image"),
    st.builds(lambda r, c: f"grid:{r}x{c}", st.integers(1, 3), st.integers(1, 3)),
    st.builds(lambda p: f"patch:{p}", st.integers(1, 4)),
)


@st.composite
def moe_settings(draw) -> dict[str, Any]:
    num_experts = draw(st.integers(1, 5))
    router = draw(st.sampled_from(["token_choice", "expert_choice", "positional"]))
    return {
        "num_experts": num_experts,
        "top_k": draw(st.integers(1, num_experts)),
        "tokens": draw(tokens),
        "router": router,
        "capacity_factor": draw(st.sampled_from([None, 0.5, 1.0, 2.0])),
    }


@st.composite
def cases(draw, moe: st.SearchStrategy | None = None) -> Case:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    kernel = draw(st.tuples(st.integers(1, 4), st.integers(1, 4)))
    stride = draw(pairs)
    padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                             st.sampled_from(["same", "valid"])))
    return Case(
        in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3)),
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=draw(st.tuples(st.integers(1, 2), st.integers(1, 2))),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])),
        batch=draw(st.integers(1, 3)),
        height=draw(st.integers(1, MAX_SIDE)),
        width=draw(st.integers(1, MAX_SIDE)),
        moe=draw(moe if moe is not None else moe_settings()),
    )


def _conv_or_error(case: Case) -> tuple[nn.Conv2d | None, torch.Size | None]:
    """nn.Conv2d on the case: (conv, output shape), (conv, None) for a refused input, (None, None) for a
    refused geometry."""
    try:
        conv = case.conv()
    except (ValueError, RuntimeError):
        return None, None
    try:
        return conv, conv(case.input()).shape
    except (ValueError, RuntimeError):
        return conv, None


def _grid_too_large(case: Case, out_shape: torch.Size) -> bool:
    match = re.fullmatch(r"grid:(\d+)x(\d+)", case.moe["tokens"])
    return bool(match) and (out_shape[2] < int(match[1]) or out_shape[3] < int(match[2]))


@given(cases())
@SETTINGS
def test_block_behaves_like_conv2d(case: Case):
    conv, out_shape = _conv_or_error(case)
    if conv is None:
        event("geometry refused")
        with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
            case.block()
        return
    block = randomize_experts(case.block()).train()
    x = case.input()
    if out_shape is None:
        event("input refused")
        with pytest.raises(ValueError, match="MoEConv2d"):
            block(x)
        return
    if _grid_too_large(case, out_shape):
        event("grid larger than the map")
        with pytest.raises(ValueError, match="tokens 'grid"):
            block(x)
        return
    event("output checked")
    y = block(x)
    assert y.shape == out_shape
    assert bool(y.isfinite().all())
    assert bool(block.last_aux.total.isfinite())
    dense = MoEConv2d(case.in_channels, case.out_channels, **case.conv_kwargs(), **case.moe, dispatcher="dense")
    dense.load_state_dict(block.state_dict())
    assert max_abs_diff(dense.train()(x), y) < 1e-4


@given(cases(moe=st.fixed_dictionaries({"num_experts": st.integers(1, 4), "top_k": st.just(1),
                                        "tokens": tokens, "upcycle_noise_std": st.just(0.0)})),
       st.sampled_from(["sparse", "dense"]), st.integers(1, 4))
@SETTINGS
def test_upcycled_block_equals_conv2d(case: Case, dispatcher: str, top_k: int):
    conv, out_shape = _conv_or_error(case)
    if out_shape is None or _grid_too_large(case, out_shape):
        event("not a valid input")
        return
    event("output checked")
    top_k = min(top_k, case.moe["num_experts"])
    block = MoEConv2d.from_conv(conv, **{**case.moe, "top_k": top_k}, dispatcher=dispatcher).eval()
    x = case.input()
    assert max_abs_diff(block(x), conv(x)) < 1e-5


def _touched(case: Case, bad: torch.Tensor) -> torch.Tensor:
    """Output positions whose receptive field contains a non-finite input value, (B, H_out, W_out)."""
    probe = nn.Conv2d(1, 1, case.kernel_size, stride=case.stride, padding=case.padding, dilation=case.dilation,
                      bias=False, padding_mode=case.padding_mode)
    nn.init.ones_(probe.weight)
    with torch.no_grad():
        return probe(bad.any(dim=1, keepdim=True).float())[:, 0] > 0


@given(cases(), st.integers(0, MAX_SIDE - 1), st.integers(0, MAX_SIDE - 1), st.sampled_from(["nan", "inf", "-inf"]),
       st.sampled_from(["sparse", "dense"]))
@SETTINGS
def test_non_finite_input_propagates_to_its_tokens_only(case: Case, row: int, col: int, value: str,
                                                        dispatcher: str):
    _, out_shape = _conv_or_error(case)
    if out_shape is None or _grid_too_large(case, out_shape):
        event("not a valid input")
        return
    event("output checked")
    block = randomize_experts(case.block(dispatcher=dispatcher)).eval()
    x = case.input()
    clean_y = block(x)
    clean = block.last_routing
    x[0, :, row % case.height, col % case.width] = float(value)
    y = block(x)
    routing = block.last_routing

    # The tokens the router saw as non-finite: NaN weights, still dispatched (their output is NaN).
    invalid = routing.combine_weight.isnan().any(dim=-1)  # (B, N)
    assert bool((routing.combine_weight.isnan().all(dim=-1) == invalid).all())
    assert bool(routing.slot_mask[invalid].any(dim=-1).all())
    position_invalid = invalid[:, routing_token_map(block, out_shape)].reshape(y.shape[0], *y.shape[2:])
    assert bool(y.isnan().any(dim=1)[position_invalid].all())
    # No finite token loses a slot or changes experts (a NaN token never outranks a finite one).
    finite = ~invalid
    lost = clean.slot_mask & ~routing.slot_mask & finite[..., None]
    assert not bool(lost.any())
    assert torch.equal(routing.expert_index[finite], clean.expert_index[finite])
    # Outputs away from the bad value, of tokens whose routing is unchanged, are unchanged.
    same_route = (routing.slot_mask == clean.slot_mask).all(dim=-1) & finite
    same_position = same_route[:, routing_token_map(block, out_shape)].reshape(y.shape[0], *y.shape[2:])
    keep = same_position & ~_touched(case, ~x.isfinite())
    assert max_abs_diff(y.permute(0, 2, 3, 1)[keep], clean_y.permute(0, 2, 3, 1)[keep]) < 1e-5


def routing_token_map(block: MoEConv2d, out_shape: torch.Size) -> torch.Tensor:
    """Token id of every output position of the block's last pass, (H_out * W_out,)."""
    return block.tokens.split(torch.zeros(1, 1, out_shape[2], out_shape[3])).token_map


def test_whole_input_nan_is_loud_not_routed_to_one_expert():
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=1, capacity_factor=1.0).eval()
    y = block(torch.full((2, 4, 6, 6), float("nan")))
    assert bool(y.isnan().all())
    assert float(block.last_aux.total) == 0.0  # eval computes no balancing loss (documented on MoEConv2d)
    load = block.last_routing.expert_load()
    assert float(load.sum()) == 2 * 36  # every token dispatched once, with a NaN weight
    block.train()(torch.full((2, 4, 6, 6), float("nan")))
    assert bool(block.last_aux.total.isnan())  # in training the losses are computed, and NaN is loud


@pytest.mark.parametrize(("shape", "message"), [
    ((2, 4, 9), r"expects a \(B, C, H, W\) input, got shape \(2, 4, 9\)"),
    ((1, 2, 4, 9, 9), r"expects a \(B, C, H, W\) input"),
    ((2, 3, 9, 9), r"got 3 input channels, expected in_channels=4"),
    ((2, 4, 2, 9), r"smaller than the kernel's reach"),
])
def test_invalid_inputs_raise_a_clear_value_error(shape, message):
    block = MoEConv2d(4, 4, 5, num_experts=2, tokens="grid:2x2")
    with pytest.raises(ValueError, match=message):
        block(torch.randn(*shape))


@pytest.mark.parametrize(("mode", "size", "bound"), [("reflect", 2, "smaller than"), ("circular", 1, "at most")])
def test_padding_that_cannot_wrap_the_input_is_a_value_error(mode, size, bound):
    block = MoEConv2d(2, 2, 1, padding=2, padding_mode=mode, num_experts=2)
    with pytest.raises(ValueError, match=rf"padding_mode='{mode}' needs padding {bound} the input size"):
        block(torch.randn(1, 2, size, 5))
    assert block(torch.randn(1, 2, 3, 5)).shape == (1, 2, 7, 9)


def test_a_grid_larger_than_the_map_names_the_tokens():
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=2, tokens="grid:3x3")
    with pytest.raises(ValueError, match=r"tokens 'grid:3x3' needs a feature map of at least 3x3, got 2x5"):
        block(torch.randn(1, 4, 2, 5))


@pytest.mark.parametrize("tokens", ["pixel", "grid:2x2", "image"])
@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "positional"])
def test_an_empty_batch_gives_an_empty_output_like_conv2d(tokens, router):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    block = MoEConv2d.from_conv(conv, num_experts=3, top_k=1, tokens=tokens, router=router,
                                losses={"switch": 0.01, "z": 0.001, "importance": 0.01})
    x = torch.randn(0, 4, 7, 7)
    y = block(x)
    assert y.shape == conv(x).shape
    assert float(block.last_aux.total.detach()) == 0.0  # not NaN: an empty rank must not poison DDP's all-reduce
    (y.sum() + block.last_aux.total).backward()
    assert block.experts.weight.grad is not None
    assert not bool(block.experts.weight.grad.any())
