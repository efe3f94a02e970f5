"""Weights and layouts built once and reused at inference: only when asked, never stale, never in a graph or
a pickle."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from convmoe import MoEConv2d
from convmoe.dispatch import DenseDispatcher
from convmoe.experts.derived import cached_weights, derived_weight
from convmoe.routers import TokenChoiceRouter
from convmoe.tokens import create_tokens


def _block(tokens: str = "pixel", dispatcher: str = "sparse") -> MoEConv2d:
    torch.manual_seed(0)
    block = MoEConv2d.from_conv(nn.Conv2d(6, 10, 3, padding=1), num_experts=4, top_k=2, tokens=tokens,
                                experts="lowrank", expert_kwargs={"rank": 2, "alpha": 4.0}, dispatcher=dispatcher)
    with torch.no_grad():
        block.experts.up.normal_()
    return block.eval()


def _reference(block: MoEConv2d, x: torch.Tensor) -> torch.Tensor:
    """The same block's output through the dense reference dispatcher with autograd on (nothing cached)."""
    reference = copy.deepcopy(block)
    reference.dispatcher = DenseDispatcher()
    return reference(x).detach()


def _changes() -> dict[str, object]:
    def optimizer_step(block: MoEConv2d) -> None:
        optimizer = torch.optim.SGD(block.parameters(), lr=0.5)
        block.train()
        block(torch.randn(2, 6, 7, 7)).square().mean().backward()
        optimizer.step()
        block.eval()

    def load_state_dict(block: MoEConv2d) -> None:
        state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in block.state_dict().items()}
        block.load_state_dict(state)

    def replace_data(block: MoEConv2d) -> None:
        block.experts.down.data = torch.randn_like(block.experts.down)

    def cast(block: MoEConv2d) -> None:
        block.double()

    def rescale(block: MoEConv2d) -> None:
        block.experts.alpha = 0.5

    return {"optimizer_step": optimizer_step, "load_state_dict": load_state_dict, "replace_data": replace_data,
            "cast": cast, "rescale": rescale}


@pytest.mark.parametrize("change", list(_changes()))
@pytest.mark.parametrize("dispatcher", ["sparse", "dense"])
def test_cached_outputs_follow_every_tracked_parameter_change(change: str, dispatcher: str) -> None:
    block, x = _block(dispatcher=dispatcher), torch.randn(2, 6, 7, 7)
    with cached_weights(block), torch.no_grad():
        before = block(x)
        torch.testing.assert_close(before, _reference(block, x), rtol=1e-5, atol=1e-5)
        with torch.enable_grad():
            _changes()[change](block)
        x = x.to(block.experts.down.dtype)
        after = block(x)
    if change == "cast":  # same values, now computed in float64
        assert after.dtype == torch.float64
    else:
        assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, _reference(block, x), rtol=1e-5, atol=1e-5)


def test_weights_are_kept_only_inside_cached_weights_and_dropped_on_exit() -> None:
    block, x = _block(), torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        expected = block(x)
    assert "_derived_weights" not in block.experts.__dict__  # not asked: nothing kept
    with cached_weights(block), torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)
        cached = dict(block.experts.__dict__["_derived_weights"])
        block(x)
        assert cached.keys() == {"scaled_up", "deltas_with_base"}
        assert all(block.experts.__dict__["_derived_weights"][name][2] is cached[name][2] for name in cached)
    assert "_derived_weights" not in block.experts.__dict__
    # With autograd the weights are built in the graph: every factor and W0 gets a gradient.
    block.train()
    with cached_weights(block):
        block(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (block.experts.base_weight, block.experts.down,
                                                                         block.experts.up))


def test_pickles_and_copies_carry_no_derived_weights_and_to_drops_them() -> None:
    block, x = _block(), torch.randn(1, 6, 5, 5)
    with cached_weights(block), torch.no_grad():
        expected = block(x)
        assert "_derived_weights" in block.experts.__dict__
        for clone in (pickle.loads(pickle.dumps(block)), copy.deepcopy(block)):
            assert "_derived_weights" not in clone.experts.__dict__
            assert "_derived_weights_cached" not in clone.experts.__dict__
            torch.testing.assert_close(clone(x), expected)
        block.to(torch.float64)
        assert "_derived_weights" not in block.experts.__dict__


def test_derived_weight_is_not_cached_with_autograd_on() -> None:
    layer, calls = nn.Linear(2, 2), []

    def build() -> torch.Tensor:
        calls.append(1)
        return layer.weight.t()

    with cached_weights(layer):
        derived_weight(layer, "t", [layer.weight], build)
        derived_weight(layer, "t", [layer.weight], build)
    assert len(calls) == 2
    assert "_derived_weights" not in layer.__dict__


@pytest.mark.parametrize("tokens", ["grid:3x3", "patch:2"])
def test_token_layout_first_built_under_inference_mode_still_trains(tokens: str) -> None:
    # A cached layout built under inference_mode must be a normal tensor: the gather of position weights
    # saves it for backward. The 11x13 size is used by no other test, so the layout is built here.
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=3, top_k=2, tokens=tokens, dispatcher="dense")
    x = torch.randn(2, 4, 11, 13)
    with torch.inference_mode():
        block.eval()(x)
    first = block.tokens.split(x).token_map
    assert not first.is_inference()
    block.train()(x).sum().backward()
    assert block.router.gate.proj.weight.grad is not None
    assert block.tokens.split(x).token_map is first  # built once per layout


def test_finite_logits_whose_sum_overflows_route_as_usual() -> None:
    # The eager CPU fast path checks one sum of the logits; when that overflows to inf although every
    # logit is finite, the masked path must route exactly the same.
    router = TokenChoiceRouter(2, num_experts=4, top_k=1)
    with torch.no_grad():
        router.gate.proj.weight.copy_(torch.tensor([[1e38, 0], [9e37, 0], [8e37, 0], [0, 1.0]]))
        router.gate.proj.bias.zero_()
    tokens = create_tokens("pixel").split(torch.tensor([[[[1.0, 2.0]], [[0.5, 0.5]]]]))  # (1, 2, 1, 2)
    routing = router(tokens)
    assert torch.isfinite(routing.logits).all()
    assert torch.isinf(routing.logits.sum())
    assert routing.expert_index.tolist() == [[[0], [0]]]
    assert routing.combine_weight.tolist() == [[[1.0], [1.0]]]
