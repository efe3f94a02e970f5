"""convmoe.describe: the table of MoE blocks, parameters added and active FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convmoe
from convmoe import MoEConfig
from convmoe.describe import describe_blocks, summarize_block


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 8, 1))


def test_table_lists_every_block_with_its_geometry_and_routing() -> None:
    model = convmoe.patch(net(), targets=["0", "2", "4"], config=MoEConfig(num_experts=4, top_k=2))
    convmoe.patch(model, targets="5", config=MoEConfig(num_experts=8, top_k=1, tokens="grid:2x2",
                                                       router="expert_choice"))
    lines = convmoe.describe(model).splitlines()
    assert lines[0].split() == ["block", "replaces", "experts", "top-k", "tokens", "router", "params+", "active/dense"]
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert list(rows) == ["0", "2", "4", "5"]
    assert "3->16 3x3 " in rows["0"]
    assert "16->32 3x3 s2" in rows["2"]
    assert "32->32 3x3 dw" in rows["4"]
    assert rows["5"].split()[3:7] == ["8", "1", "grid:2x2", "expert_choice"]
    assert lines[-1].startswith("4 MoE block(s), +")


def test_parameters_added_are_the_block_minus_the_dense_conv() -> None:
    model = convmoe.patch(net(), targets="2", config=MoEConfig(num_experts=4, top_k=2, shared_expert=True))
    (row,) = describe_blocks(model)
    block_params = sum(p.numel() for p in model[2].parameters())
    dense_params = 32 * 16 * 9 + 32
    assert row.params_added == block_params - dense_params
    assert row.converter == "conv2d"


@pytest.mark.parametrize(("config", "expected"), [
    # k experts + the router's 16 x E weights per pixel, over the dense 32 x 16 x 9 MACs per position.
    (MoEConfig(num_experts=4, top_k=2), 2 + 16 * 4 / (32 * 16 * 9)),
    (MoEConfig(num_experts=4, top_k=1, shared_expert=True), 1 + 1 + 16 * 4 / (32 * 16 * 9)),
    (MoEConfig(num_experts=8, top_k=2, router="expert_choice"), 1.25 * 2 + 16 * 8 / (32 * 16 * 9)),
    (MoEConfig(num_experts=4, top_k=2, tokens="grid:2x2"), 2.0),  # region router cost left out without inputs
])
def test_analytic_active_flops_ratio(config: MoEConfig, expected: float) -> None:
    model = convmoe.patch(net(), targets="2", config=config)
    (row,) = describe_blocks(model)
    assert row.active_flops_ratio == pytest.approx(expected)


def test_inputs_give_the_router_cost_of_region_tokens_and_measured_slots() -> None:
    model = convmoe.patch(net(), targets="2", config=MoEConfig(num_experts=4, top_k=2, tokens="grid:2x2"))
    x = torch.randn(2, 3, 12, 12)
    model.train()
    (row,) = describe_blocks(model, inputs=x)
    assert model.training, "describe restores the training mode"
    assert not model[2]._forward_pre_hooks, "describe removes its hooks"
    positions = 6 * 6  # stride 2 on 12 x 12
    assert row.active_flops_ratio == pytest.approx(2 + 16 * 4 * 4 / positions / (32 * 16 * 9))

    capped = convmoe.patch(net(), targets="2", config=MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5))
    (row,) = describe_blocks(capped, inputs=x)
    routing = capped[2].last_routing
    measured = float(routing.slot_mask.float().sum(-1).mean())
    assert row.k_eff == pytest.approx(measured)
    assert row.k_eff < 2


def test_summarize_block_matches_describe() -> None:
    model = convmoe.patch(net(), targets="4", config=MoEConfig(num_experts=2, top_k=1))
    assert summarize_block("4", model[4]) == describe_blocks(model)[0]


def test_describe_a_model_without_blocks() -> None:
    assert convmoe.describe(net()) == "Sequential: no MoE blocks"
