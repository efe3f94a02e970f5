"""Routers: logits, probabilities, top-k / expert-choice selection, noise, temperature and capacity."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOKEN_SPECS, default_top_k

from convmoe import ROUTERS, MoEConv2d, compute_stats, create_router, create_tokens
from convmoe.gates import ConvGAPGate, LinearGate, PositionalGate
from convmoe.routers import (
    ExpertChoiceRouter,
    PositionalRouter,
    TokenChoiceRouter,
    capacity_keep_mask,
    capacity_of,
    normalized_weights,
)

E = 4


def split(spec: str, batch: int = 2, channels: int = 4, size: tuple[int, int] = (9, 9)):
    return create_tokens(spec).split(torch.randn(batch, channels, *size))


@pytest.mark.parametrize("spec", TOKEN_SPECS)
@pytest.mark.parametrize("name", ROUTERS.names())
def test_routing_is_consistent(name: str, spec: str) -> None:
    tokens = split(spec)
    router = create_router(name, in_channels=4, num_experts=E, top_k=default_top_k(name), temperature=0.7).eval()
    routing = router(tokens)
    B, N = 2, tokens.num_tokens

    assert routing.logits.dtype == torch.float32
    assert routing.logits.shape == (B, N, E)
    torch.testing.assert_close(routing.probs, torch.softmax(routing.logits / 0.7, dim=-1))
    assert routing.expert_index.dtype == torch.int64
    assert routing.expert_index.shape == routing.combine_weight.shape == routing.slot_mask.shape
    assert routing.dropped.shape == (B, N)
    # a token is dropped exactly when none of its slots is dispatched, and only dispatched slots weigh
    torch.testing.assert_close(routing.dropped, ~routing.slot_mask.any(dim=-1))
    assert (routing.combine_weight[~routing.slot_mask] == 0).all()
    kept = routing.combine_weight.sum(-1)[~routing.dropped]
    torch.testing.assert_close(kept, torch.ones_like(kept))
    # the weight of a dispatched slot is the probability of its expert, renormalised over the token's slots
    chosen_probs = routing.probs.gather(-1, routing.expert_index) * routing.slot_mask
    expected = chosen_probs / chosen_probs.sum(-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(routing.combine_weight, expected)


@pytest.mark.parametrize("spec", TOKEN_SPECS)
def test_token_choice_takes_the_top_k_experts(spec: str) -> None:
    routing = TokenChoiceRouter(4, num_experts=E, top_k=2).eval()(split(spec))
    top_probs, top_index = routing.probs.topk(2, dim=-1)
    torch.testing.assert_close(routing.expert_index, top_index)
    torch.testing.assert_close(routing.combine_weight, top_probs / top_probs.sum(-1, keepdim=True))
    assert routing.slot_mask.all()
    assert not routing.dropped.any()
    assert routing.capacity is None


def test_top_1_weight_passes_gradient_to_the_router() -> None:
    router = TokenChoiceRouter(4, num_experts=E, top_k=1)
    routing = router(split("pixel"))
    torch.testing.assert_close(routing.combine_weight, torch.ones_like(routing.combine_weight))
    (routing.combine_weight * torch.randn_like(routing.combine_weight)).sum().backward()
    assert router.gate.proj.weight.grad.abs().sum() > 0


def test_normalized_weights_by_hand() -> None:
    weights = normalized_weights(torch.tensor([[0.3, 0.1], [0.2, 0.2]]), torch.tensor([[True, True], [True, False]]))
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.25], [1.0, 0.0]]))


def test_noise_only_in_training() -> None:
    tokens = split("pixel")
    router = TokenChoiceRouter(4, num_experts=E, top_k=2, noise_std=1.0)
    clean = router.eval()(tokens).logits
    torch.testing.assert_close(router.eval()(tokens).logits, clean, atol=0, rtol=0)
    torch.manual_seed(3)
    noisy = router.train()(tokens).logits
    torch.manual_seed(3)
    expected = clean + torch.randn(clean.shape)  # drawn in (B, N, E) order, whatever the logits' memory layout
    torch.testing.assert_close(noisy, expected)
    quiet = TokenChoiceRouter(4, num_experts=E, top_k=2, noise_std=0.0)
    torch.testing.assert_close(quiet.train()(tokens).logits, quiet.eval()(tokens).logits, atol=0, rtol=0)


def test_router_logits_stay_float32_under_autocast() -> None:
    router = TokenChoiceRouter(4, num_experts=E, top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(split("grid:3x3"))
    assert routing.logits.dtype == torch.float32
    assert routing.probs.dtype == torch.float32


def test_capacity_of_formula() -> None:
    assert capacity_of(1.25, tokens_per_group=64, top_k=2, num_experts=8) == 20
    assert capacity_of(1.0, tokens_per_group=81, top_k=2, num_experts=4) == math.ceil(81 * 2 / 4)
    assert capacity_of(0.01, tokens_per_group=9, top_k=1, num_experts=4) == 1  # at least one
    assert capacity_of(10.0, tokens_per_group=9, top_k=2, num_experts=4) == 9  # at most T


@pytest.mark.parametrize(("spec", "batch", "capacity_factor", "top_k"), [
    ("pixel", 2, 1.25, 2),
    ("pixel", 2, 1.0, 1),
    ("grid:3x3", 2, 1.0, 2),
    ("patch:4", 3, 2.0, 1),
    ("image", 4, 1.0, 2),
    ("image", 6, 1.25, 1),
])
def test_expert_choice_fills_every_expert_to_capacity(spec: str, batch: int, capacity_factor: float,
                                                      top_k: int) -> None:
    tokens = split(spec, batch=batch)
    router = ExpertChoiceRouter(4, num_experts=E, top_k=top_k, capacity_factor=capacity_factor).eval()
    routing = router(tokens)
    group = batch * tokens.num_tokens if spec == "image" else tokens.num_tokens
    capacity = math.ceil(capacity_factor * group * top_k / E)
    assert routing.capacity == capacity
    assert routing.capacity_groups == (1 if spec == "image" else batch)

    # (G, T, E): per image, or the whole batch for image tokens
    mask = routing.slot_mask.reshape(routing.capacity_groups, -1, E)
    probs = routing.probs.reshape(routing.capacity_groups, -1, E)
    assert (mask.sum(dim=1) == capacity).all()
    for g in range(routing.capacity_groups):
        for e in range(E):
            chosen = set(mask[g, :, e].nonzero().flatten().tolist())
            assert chosen == set(probs[g, :, e].topk(capacity).indices.tolist())
    assert (routing.expert_index == torch.arange(E)).all()
    torch.testing.assert_close(routing.expert_load(), torch.full((E,), float(capacity * routing.capacity_groups)))


def test_expert_choice_default_capacity_factor_is_1_25() -> None:
    assert ExpertChoiceRouter(4, num_experts=E).capacity_factor == 1.25


def test_positional_router_defaults() -> None:
    router = PositionalRouter(4, num_experts=E)
    assert router.top_k == 1
    assert router.capacity_factor == 1.25
    assert isinstance(router.gate, PositionalGate)
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=E, top_k=1, router="positional", tokens="patch:2")
    assert block.router.capacity_factor == 1.25
    block(torch.randn(2, 4, 8, 8))
    assert block.last_routing.capacity == math.ceil(1.25 * 16 * 1 / E)


@pytest.mark.parametrize(("gate", "cls"), [("linear", LinearGate), ("conv_gap", ConvGAPGate),
                                           ("positional", PositionalGate)])
def test_every_gate_drives_a_router(gate: str, cls: type) -> None:
    router = TokenChoiceRouter(4, num_experts=E, top_k=2, gate=gate)
    assert isinstance(router.gate, cls)
    assert router(split("grid:3x3")).logits.shape == (2, 9, E)


def test_capacity_keep_mask_by_hand() -> None:
    # expert 0 is asked by tokens 0, 1, 3 (probabilities 0.6, 0.9, 0.7) and keeps 2: token 0 goes
    index = torch.tensor([[[0, 1], [0, 2], [1, 2], [0, 1]]])
    priority = torch.tensor([[[0.6, 0.3], [0.9, 0.05], [0.5, 0.4], [0.7, 0.2]]])
    keep = capacity_keep_mask(index, priority, num_experts=3, capacity=2)
    # expert 1: slots (0, 0.3), (2, 0.5), (3, 0.2) -> drops token 3's; expert 2: (1, 0.05), (2, 0.4) fit
    expected = torch.tensor([[[False, True], [True, True], [True, True], [True, False]]])
    assert torch.equal(keep, expected)


def forced_router(top_k: int, capacity_factor: float) -> TokenChoiceRouter:
    """Every token's first choice is expert 0 and second choice expert 1; p_0 grows with channel 0."""
    router = TokenChoiceRouter(2, num_experts=E, top_k=top_k, capacity_factor=capacity_factor).eval()
    with torch.no_grad():
        router.gate.proj.weight.zero_()
        router.gate.proj.weight[0, 0] = 1.0
        router.gate.proj.bias.copy_(torch.tensor([5.0, 1.0, 0.0, -1.0]))
    return router


def test_token_choice_capacity_drops_lowest_probability_first() -> None:
    x = torch.rand(1, 2, 4, 4)
    routing = forced_router(top_k=1, capacity_factor=1.0)(create_tokens("pixel").split(x))
    assert routing.capacity == 4  # ceil(1.0 * 16 * 1 / 4)
    assert (routing.expert_index[..., 0] == 0).all()
    kept = routing.slot_mask[0, :, 0]
    assert kept.sum() == 4
    strongest = x[0, 0].flatten().topk(4).indices  # p_0 grows with channel 0
    assert set(kept.nonzero().flatten().tolist()) == set(strongest.tolist())
    assert torch.equal(routing.dropped[0], ~kept)
    assert (routing.combine_weight[0, ~kept] == 0).all()

    stats = compute_stats(routing)
    assert stats.dropped_rate == pytest.approx(12 / 16)
    assert stats.capacity_ratio == pytest.approx(4 / (E * 4))
    assert stats.utilization == [1.0, 0.0, 0.0, 0.0]


def test_token_choice_capacity_with_two_slots_per_token() -> None:
    x = torch.rand(1, 2, 4, 4)
    routing = forced_router(top_k=2, capacity_factor=1.0)(create_tokens("pixel").split(x))
    assert routing.capacity == 8  # ceil(1.0 * 16 * 2 / 4)
    order = x[0, 0].flatten().argsort(descending=True)
    # expert 0 keeps the 8 tokens where p_0 is highest; expert 1 the 8 where p_1 is highest (lowest x)
    assert set(routing.slot_mask[0, :, 0].nonzero().flatten().tolist()) == set(order[:8].tolist())
    assert set(routing.slot_mask[0, :, 1].nonzero().flatten().tolist()) == set(order[8:].tolist())
    assert not routing.dropped.any()  # every token keeps one of its slots
    torch.testing.assert_close(routing.combine_weight.sum(-1), torch.ones(1, 16))
    stats = compute_stats(routing)
    assert stats.dropped_rate == 0.0
    assert stats.capacity_ratio == pytest.approx(16 / (E * 8))


def test_token_choice_capacity_is_per_batch_for_image_tokens() -> None:
    x = torch.rand(8, 2, 3, 3)
    routing = forced_router(top_k=1, capacity_factor=1.0)(create_tokens("image").split(x))
    assert routing.capacity == 2
    assert routing.capacity_groups == 1
    assert int(routing.slot_mask.sum()) == 2
    kept_images = routing.slot_mask[:, 0, 0].nonzero().flatten()
    assert set(kept_images.tolist()) == set(x[:, 0].mean(dim=(1, 2)).topk(2).indices.tolist())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"top_k": 5}, r"top_k=5 must be in \[1, num_experts=4\]"),
    ({"top_k": 0}, r"top_k=0 must be in \[1, num_experts=4\]"),
    ({"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
    ({"noise_std": -1.0}, r"noise_std must be >= 0, got -1.0"),
    ({"capacity_factor": 0.0}, r"capacity_factor must be > 0 or None, got 0.0"),
    ({"gate": "lineer"}, r"unknown gate 'lineer'; available: conv_gap, linear, positional \(did you mean 'linear'\?\)"),
])
@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_arguments_are_validated(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_router(name, in_channels=4, num_experts=E, **{"top_k": 1, **kwargs})


def test_create_router_accepts_instance_and_class() -> None:
    router = TokenChoiceRouter(4, num_experts=E)
    assert create_router(router, 4, E) is router
    assert isinstance(create_router(ExpertChoiceRouter, 4, E, top_k=2), ExpertChoiceRouter)
    assert "experts=4, top_k=2, noise_std=0.5, temperature=2.0, capacity_factor=1.5" in repr(
        TokenChoiceRouter(4, num_experts=E, top_k=2, noise_std=0.5, temperature=2.0, capacity_factor=1.5))


def _reference_routing(router, tokens, expert_mask=None):
    """The router's forward as written before issue 15 (isfinite masks, last-dimension softmax, masked fills)."""
    logits = router.gate(tokens).float()
    invalid = ~torch.isfinite(logits).all(dim=-1, keepdim=True)
    logits = logits.masked_fill(invalid, 0.0)
    if router.training and router.noise_std > 0:
        logits = logits + torch.randn_like(logits) * router.noise_std
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask, float("-inf"))
    probs = torch.softmax(logits / router.temperature, dim=-1)
    probs = torch.where(invalid, probs * 1e-30, probs)
    routing = router.select(logits, probs, tokens, expert_mask)
    available = torch.ones_like(routing.slot_mask)
    if routing.expert_mask is not None:
        available = routing.expert_mask[routing.expert_index]
    nan = float("nan")
    return routing, {"logits": routing.logits.masked_fill(invalid, nan), "probs": routing.probs.masked_fill(invalid, nan),
                     "combine_weight": routing.combine_weight.masked_fill(invalid, nan),
                     "slot_mask": routing.slot_mask | (invalid & available), "dropped": routing.dropped & ~invalid[..., 0]}


@pytest.mark.parametrize("spec", [*TOKEN_SPECS, "pixel"])
@pytest.mark.parametrize("name", ROUTERS.names())
@pytest.mark.parametrize("case", ["plain", "temperature", "capacity", "expert_mask", "non_finite", "noise"])
def test_routing_is_unchanged_by_the_fixed_cost_work(name: str, spec: str, case: str) -> None:
    """Issue 15: the cheaper router forward chooses the same experts with the same weights as before."""
    torch.manual_seed(0)
    kwargs = {"temperature": 0.7} if case == "temperature" else {}
    if case == "capacity":
        kwargs["capacity_factor"] = 1.0
    if case == "noise":
        kwargs["noise_std"] = 0.5
    router = create_router(name, in_channels=4, num_experts=E, top_k=2, **kwargs).train(case == "noise")
    x = torch.randn(3, 4, 9, 9)
    if case in ("non_finite", "noise"):
        x[0, :, :3, :3] = float("nan")
        x[1, 1, 4:, 4:] = float("inf")
    tokens = create_tokens(spec).split(x)
    mask = torch.tensor([True, False, True, True]) if case == "expert_mask" else None
    with torch.no_grad():
        torch.manual_seed(1)
        routing = router(tokens, mask)
        torch.manual_seed(1)
        reference, poisoned = _reference_routing(router, tokens, mask)
    assert torch.equal(routing.expert_index, reference.expert_index)
    assert torch.equal(routing.slot_mask, poisoned["slot_mask"])
    assert torch.equal(routing.dropped, poisoned["dropped"])
    for field in ("logits", "probs", "combine_weight"):
        torch.testing.assert_close(getattr(routing, field), poisoned[field], equal_nan=True, rtol=1e-6, atol=1e-7)
    assert routing.capacity == reference.capacity


def test_softmax_over_experts_equals_the_last_dimension_softmax() -> None:
    from convmoe.routers.base import softmax_over_experts

    logits = torch.randn(2, 7, 5)
    logits[0, 3, 1] = float("-inf")
    for layout in (logits, logits.transpose(1, 2).contiguous().transpose(1, 2)):
        torch.testing.assert_close(softmax_over_experts(layout), logits.softmax(dim=-1), rtol=1e-6, atol=1e-7)
