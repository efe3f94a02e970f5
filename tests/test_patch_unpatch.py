"""convmoe.unpatch: folding MoE blocks back into the convs they replaced."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convmoe
from convmoe import MoEConfig
from convmoe.patch import patched_blocks
from convmoe.patch.unpatch import fold_block, usage_weights

timm = pytest.importorskip("timm")
CONFIG = MoEConfig(num_experts=4, top_k=2)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        timm.layers.Conv2dSame(8, 8, 3, stride=2, groups=8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, dilation=2, bias=False),
    ).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 12, 11, generator=torch.Generator().manual_seed(3))


def _distinct_experts(model: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for block in patched_blocks(model).values():
            block.experts.weight.add_(torch.randn_like(block.experts.weight) * scale)
            if block.experts.bias is not None:
                block.experts.bias.add_(torch.randn_like(block.experts.bias) * scale)


def test_unpatching_an_untrained_upcycled_model_restores_it_exactly(x: torch.Tensor) -> None:
    dense = net()
    expected = dense(x)
    model = convmoe.patch(copy.deepcopy(dense), targets="*", config=CONFIG)
    report = convmoe.unpatch(model, inputs=x)
    assert report.modules == ["0", "2", "4"]
    assert report.how == "average"
    assert report.max_abs_diff <= 1e-5
    assert [type(m) for m in model] == [type(m) for m in dense]
    assert model[0].padding_mode == "reflect"
    assert model[4].bias is None
    assert model[2].groups == 8
    assert model.state_dict().keys() == dense.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_average_folds_to_the_mean_expert() -> None:
    model = convmoe.patch(net(), targets="0", config=CONFIG)
    _distinct_experts(model)
    experts = model[0].experts
    mean_weight, mean_bias = experts.weight.mean(0), experts.bias.mean(0)
    convmoe.unpatch(model)
    torch.testing.assert_close(model[0].weight, mean_weight)
    torch.testing.assert_close(model[0].bias, mean_bias)
    assert model[0].weight.requires_grad


def test_usage_weighting_is_exact_when_routing_is_constant(x: torch.Tensor) -> None:
    model = convmoe.patch(net(), targets="4", config=MoEConfig(num_experts=4, top_k=1))
    _distinct_experts(model)
    block = model[4]
    with torch.no_grad():  # every token picks expert 2: the MoE is exactly expert 2's conv
        block.router.gate.proj.weight.zero_()
        block.router.gate.proj.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    expert_two = block.experts.weight[2].detach().clone()
    patched = model(x)
    report = convmoe.unpatch(model, how="usage", inputs=x)
    assert report.expert_weights["4"] == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(model[4].weight, expert_two)
    assert report.max_abs_diff <= 1e-5
    torch.testing.assert_close(model(x), patched, atol=1e-5, rtol=0)


def test_usage_weights_are_the_share_of_the_combine_weight(x: torch.Tensor) -> None:
    model = convmoe.patch(net(), targets="0", config=CONFIG)
    _distinct_experts(model, scale=1.0)
    with torch.no_grad():
        model[0].router.gate.proj.weight.normal_()
    model(x)
    routing = model[0].last_routing
    expected = routing.dense_weights().sum(dim=(0, 1))
    weights = usage_weights(model[0])
    torch.testing.assert_close(weights, expected / expected.sum())
    folded, _ = fold_block(model[0], weights)
    torch.testing.assert_close(folded, torch.einsum("e,eoikl->oikl", weights, model[0].experts.weight))


def test_shared_expert_is_added_to_the_fold(x: torch.Tensor) -> None:
    model = convmoe.patch(net(), targets="0", config=MoEConfig(num_experts=2, top_k=1, shared_expert=True))
    with torch.no_grad():
        model[0].shared_expert.weight.normal_(std=0.1)
        model[0].shared_expert.bias.normal_(std=0.1)
    with torch.no_grad():
        patched = model(x)  # experts are still identical: the block is expert 0 + shared expert everywhere
    report = convmoe.unpatch(model, inputs=x)
    assert report.max_abs_diff <= 1e-5
    assert report.max_rel_diff == pytest.approx(report.max_abs_diff / float(patched.abs().max()))
    torch.testing.assert_close(model(x), patched, atol=1e-5, rtol=0)


def test_report_measures_the_change_and_restores_training_mode(x: torch.Tensor) -> None:
    model = convmoe.patch(net(), targets="*", config=CONFIG)
    _distinct_experts(model, scale=0.5)
    with torch.no_grad():
        for block in patched_blocks(model).values():
            block.router.gate.proj.weight.normal_()
    model.train()
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    report = convmoe.unpatch(model, inputs=x)
    assert model.training
    assert all(m.training for m in model)
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert report.max_abs_diff == pytest.approx(float((after - before).abs().max()), rel=1e-6)
    assert report.max_abs_diff > 0
    assert all(sum(w) == pytest.approx(1.0) for w in report.expert_weights.values())


def test_unpatch_without_inputs_reports_no_difference() -> None:
    report = convmoe.unpatch(convmoe.patch(net(), targets="0", config=CONFIG))
    assert report.max_abs_diff is None
    assert report.max_rel_diff is None


def test_hand_built_blocks_fold_into_plain_convs(x: torch.Tensor) -> None:
    model = nn.Sequential(convmoe.MoEConv2d(3, 4, 3, stride=2, padding=1, num_experts=2),
                          convmoe.MoEConv2d(4, 4, 3, stride=2, padding="dynamic_same", num_experts=2))
    convmoe.unpatch(model)
    assert type(model[0]) is nn.Conv2d
    assert model[0].stride == (2, 2)
    assert model[0].padding == (1, 1)
    assert type(model[1]) is timm.layers.Conv2dSame
