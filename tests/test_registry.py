"""Registries: names, classes and instances wherever a part is configurable; user parts through MoEConfig."""

from __future__ import annotations

import pytest
import torch
from conftest import make_block, max_abs_diff, with_dispatcher
from torch import Tensor, nn

from convmoe import (
    DISPATCHERS,
    DROPOUTS,
    EXPERTS,
    GATES,
    LOSSES,
    ROUTERS,
    TOKENS,
    MoEConfig,
    MoEConv2d,
    Registry,
    Routing,
    Tokens,
)
from convmoe.dispatch import DenseDispatcher
from convmoe.experts import ConvExperts
from convmoe.routers import Router, TokenChoiceRouter, normalized_weights
from convmoe.tokens import PixelTokens
from convmoe.tokens.base import Tokenizer, even_edges


def test_registry_basics() -> None:
    registry: Registry[object] = Registry("widget")

    @registry.register("round")
    class Round:
        def __init__(self, size: int = 1) -> None:
            self.size = size

    registry.register("square")(dict)
    assert registry.names() == ["round", "square"]
    assert "round" in registry
    assert "oval" not in registry
    assert registry.get("round") is Round
    assert registry.name_of(Round) == "round"
    assert registry.name_of(list) is None
    assert registry.create("round", size=3).size == 3
    assert registry.create(Round, size=2).size == 2
    instance = Round()
    assert registry.create(instance) is instance
    registry.register("round")(Round)  # the same class again is harmless
    assert repr(registry) == "Registry('widget', ['round', 'square'])"


def test_unknown_names_list_choices_and_suggest_the_closest() -> None:
    registry: Registry[object] = Registry("widget")
    registry.register("round")(dict)
    registry.register("square")(dict)
    with pytest.raises(ValueError, match=r"^unknown widget 'rond'; available: round, square \(did you mean 'round'\?\)$"):
        registry.get("rond")
    with pytest.raises(ValueError, match=r"^unknown widget 'zzz'; available: round, square$"):
        registry.get("zzz")


@pytest.mark.parametrize("registry", [TOKENS, ROUTERS, GATES, DISPATCHERS, EXPERTS, DROPOUTS, LOSSES],
                         ids=lambda r: r.kind)
@pytest.mark.usefixtures("isolated_registries")
def test_duplicate_registration_is_refused(registry: Registry) -> None:
    name = registry.names()[0]
    existing = registry.get(name)

    class Impostor:
        pass

    with pytest.raises(ValueError, match=rf"{registry.kind} name '{name}' is already registered to "
                                         rf"{existing.__qualname__}; pick another name"):
        registry.register(name)(Impostor)
    assert registry.get(name) is existing


class LowestExpertsRouter(Router):
    """Sends every token to experts 0..k-1, weighted by their probabilities."""

    def select(self, logits: Tensor, probs: Tensor, tokens: Tokens, expert_mask: Tensor | None) -> Routing:
        index = torch.arange(self.top_k, device=probs.device).expand(*probs.shape[:2], self.top_k)
        return Routing.from_top_k(logits, probs, index, normalized_weights(probs.gather(-1, index)), expert_mask)


class StripeTokens(Tokenizer):
    """Horizontal stripes: ``"stripes:R"`` cuts the map into R bands of rows."""

    def __init__(self, rows: int = 2) -> None:
        self.rows = rows
        self.spec = f"stripes:{rows}"

    def edges(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return even_edges(height, self.rows), (0, width)


@pytest.mark.usefixtures("isolated_registries")
def test_user_router_and_tokenizer_through_config(x_small: Tensor) -> None:
    ROUTERS.register("lowest")(LowestExpertsRouter)
    TOKENS.register("stripes")(StripeTokens)
    config = MoEConfig(num_experts=4, top_k=2, router="lowest", tokens="stripes:3")
    assert MoEConfig.from_json(config.to_json()) == config
    block = make_block(config=config)
    assert isinstance(block.router, LowestExpertsRouter)
    assert isinstance(block.tokens, StripeTokens)
    y = block(x_small)
    routing = block.last_routing
    assert routing.expert_index.shape == (2, 3, 2)
    assert routing.expert_load().tolist() == [6.0, 6.0, 0.0, 0.0]
    assert max_abs_diff(y, with_dispatcher(block, "dense")(x_small)) <= 1e-4
    assert "router=lowest" in block.extra_repr()
    assert "tokens=stripes:3" in block.extra_repr()


@pytest.mark.usefixtures("isolated_registries")
def test_user_classes_accepted_directly_and_written_by_name(x_small: Tensor) -> None:
    config = MoEConfig(num_experts=4, top_k=2, router=LowestExpertsRouter, tokens=StripeTokens)
    block = MoEConv2d(4, 6, 3, padding=1, config=config)
    block(x_small)
    assert block.last_routing.expert_load()[2:].sum() == 0
    with pytest.raises(TypeError, match=r"MoEConfig.tokens=.*StripeTokens.* cannot be written to a config; register "
                                        r"it with convmoe.TOKENS.register\('name'\) and use the name"):
        config.to_dict()
    TOKENS.register("stripes")(StripeTokens)
    with pytest.raises(TypeError, match=r"register it with convmoe.ROUTERS.register\('name'\)"):
        config.to_dict()
    ROUTERS.register("lowest")(LowestExpertsRouter)
    assert config.to_dict()["router"] == "lowest"
    assert config.to_dict()["tokens"] == "stripes"


@pytest.mark.parametrize(("field", "registry_name"), [
    ("gate", "GATES"), ("dispatcher", "DISPATCHERS"), ("experts", "EXPERTS"), ("dropout", "DROPOUTS")])
def test_unregistered_part_error_names_the_right_registry(field: str, registry_name: str) -> None:
    class Unregistered:
        pass

    with pytest.raises(TypeError, match=rf"MoEConfig.{field}=.* register it with convmoe.{registry_name}.register"):
        MoEConfig(**{field: Unregistered}).to_dict()


def test_instances_accepted_as_parts(x_small: Tensor) -> None:
    router = TokenChoiceRouter(4, num_experts=4, top_k=1)
    tokens = StripeTokens(3)
    block = MoEConv2d(4, 6, 3, padding=1, num_experts=4, top_k=1, router=router, tokens=tokens,
                      dispatcher=DenseDispatcher())
    assert block.router is router
    assert block.tokens is tokens
    assert block(x_small).shape == (2, 6, 9, 9)


class CountingExperts(ConvExperts):
    """Conv experts that count the windows they compute."""

    def forward_segments(self, windows: Tensor, counts: list[int]) -> Tensor:
        self.seen = getattr(self, "seen", 0) + sum(counts)
        return super().forward_segments(windows, counts)


class FirstExpertOut(nn.Module):
    """An expert-dropout policy that always removes expert 0."""

    def __init__(self, drop_rate: float = 0.0) -> None:
        super().__init__()

    def forward(self, num_experts: int, min_keep: int, device: torch.device) -> Tensor:
        mask = torch.ones(num_experts, dtype=torch.bool, device=device)
        mask[0] = False
        return mask


class MeanGate(nn.Module):
    """Logits from the token mean, through a linear layer without bias."""

    def __init__(self, in_channels: int, num_experts: int, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, num_experts, bias=False, device=device, dtype=dtype)

    def forward(self, tokens: Tokens) -> Tensor:
        return self.proj(tokens.mean())


@pytest.mark.usefixtures("isolated_registries")
def test_user_experts_gate_dispatcher_and_dropout_through_config(x_small: Tensor) -> None:
    EXPERTS.register("counting")(CountingExperts)
    GATES.register("mean")(MeanGate)
    DISPATCHERS.register("reference")(DenseDispatcher)
    DROPOUTS.register("first_out")(FirstExpertOut)
    config = MoEConfig(num_experts=4, top_k=1, tokens="grid:3x3", experts="counting", gate="mean",
                       dispatcher="sparse:regions", dropout="first_out")
    assert MoEConfig.from_dict(config.to_dict()) == config
    block = make_block(config=config).train()
    assert isinstance(block.experts, CountingExperts)
    assert isinstance(block.router.gate, MeanGate)
    y = block(x_small)
    assert block.experts.seen == 2 * 9  # B * N routed windows, one expert each
    assert block.last_routing.expert_load()[0] == 0  # the policy removed expert 0
    reference = with_dispatcher(block, "reference")
    assert isinstance(reference.dispatcher, DenseDispatcher)
    assert max_abs_diff(y, reference(x_small)) <= 1e-4


def test_pixel_tokens_class_name_round_trip() -> None:
    assert TOKENS.name_of(PixelTokens) == "pixel"
    assert MoEConfig(tokens=PixelTokens).to_dict()["tokens"] == "pixel"
