"""convmoe.aux_loss and convmoe.routing_stats over a model, and compute_stats by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import convmoe
from convmoe import MoEConv2d, Routing, compute_stats, moe_blocks
from convmoe.diagnostics import ModelRoutingStats


def two_block_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        MoEConv2d(4, 8, 3, padding=1, num_experts=4, top_k=2, tokens="grid:3x3", losses={"switch": 0.01, "z": 0.001}),
        nn.ReLU(),
        MoEConv2d(8, 6, 3, padding=1, num_experts=6, top_k=1, tokens="pixel", router="expert_choice",
                  losses={"importance": 0.5, "diversity": 0.1}),
        nn.Conv2d(6, 2, 1),
    )


def test_aux_loss_is_the_sum_of_the_blocks_weighted_terms() -> None:
    model = two_block_model().train()
    model(torch.randn(2, 4, 9, 9))
    blocks = [model[0], model[2]]
    expected = sum(sum(b.last_aux.weights[name] * term for name, term in b.last_aux.terms.items()) for b in blocks)
    aux = convmoe.aux_loss(model)
    assert aux.shape == ()
    assert aux.requires_grad
    torch.testing.assert_close(aux, expected)
    torch.testing.assert_close(aux, model[0].last_aux.total + model[2].last_aux.total)

    aux.backward()
    for block in blocks:
        grads = [p.grad for p in block.router.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_aux_loss_of_a_model_without_moe_is_zero() -> None:
    aux = convmoe.aux_loss(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert aux.shape == ()
    assert float(aux) == 0.0
    assert float(convmoe.aux_loss(nn.ReLU())) == 0.0  # no parameters at all
    assert float(convmoe.aux_loss(two_block_model())) == 0.0  # MoE blocks before any forward pass


def test_moe_blocks_finds_nested_blocks() -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), MoEConv2d(4, 4, 1, num_experts=2)),
                          MoEConv2d(4, 4, 1, num_experts=2))
    assert [name for name, _ in moe_blocks(model)] == ["0.1", "1"]


def test_routing_stats_of_both_blocks() -> None:
    model = two_block_model().eval()
    x = torch.randn(2, 4, 9, 9)
    model(x)
    stats = convmoe.routing_stats(model)
    assert isinstance(stats, ModelRoutingStats)
    assert list(stats.blocks) == ["0", "2"]
    for name, block, num_experts, tokens in [("0", model[0], 4, 2 * 9), ("2", model[2], 6, 2 * 81)]:
        s = stats[name]
        assert s.num_experts == num_experts
        assert s.tokens == tokens
        assert len(s.utilization) == num_experts
        assert sum(s.utilization) == pytest.approx(1.0, abs=1e-5)
        load = block.last_routing.expert_load()
        assert s.utilization == pytest.approx((load / load.sum()).tolist(), abs=1e-6)
        assert 0.0 <= s.utilization_entropy <= 1.0 + 1e-6
        assert 0.0 <= s.router_entropy <= 1.0 + 1e-6
        assert s.imbalance >= 1.0 - 1e-6
        assert s.imbalance == pytest.approx(float(load.max() / load.mean()))
        assert 0.0 <= s.dropped_rate <= 1.0
        assert sorted(s.dead_experts + s.active_experts) == list(range(num_experts))
        assert not set(s.dead_experts) & set(s.active_experts)
        assert s.as_dict()["num_experts"] == num_experts
    # expert choice: perfectly balanced by construction, capacity ceil(1.25 * 81 * 1 / 6) per image
    assert stats["2"].imbalance == pytest.approx(1.0)
    assert stats["2"].capacity_ratio == pytest.approx(1.0)
    assert stats["0"].capacity_ratio is None

    summary = stats.summary()
    assert summary["blocks"] == 2
    assert summary["imbalance_max"] == max(stats["0"].imbalance, stats["2"].imbalance)
    assert summary["dead_experts"] == len(stats["0"].dead_experts) + len(stats["2"].dead_experts)
    table = stats.table()
    assert table.splitlines()[0].startswith("block")
    assert len(table.splitlines()) == 4
    assert convmoe.routing_stats(nn.Conv2d(1, 1, 1)).blocks == {}


def test_compute_stats_by_hand() -> None:
    # 4 tokens, 4 experts, top-1: loads [3, 1, 0, 0]; uniform router probabilities
    index = torch.tensor([[[0], [0], [0], [1]]])
    routing = Routing.from_top_k(torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.25), index, torch.ones(1, 4, 1))
    s = compute_stats(routing)
    assert s.utilization == [0.75, 0.25, 0.0, 0.0]
    expected_entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert s.utilization_entropy == pytest.approx(expected_entropy)
    assert s.router_entropy == pytest.approx(1.0)
    assert s.imbalance == pytest.approx(3.0)  # max load 3 over mean load 1
    assert s.dead_experts == [2, 3]
    assert s.active_experts == [0, 1]
    assert s.dropped_rate == 0.0
    assert s.capacity_ratio is None
    assert s.tokens == 4
    assert s.medoe_expert_utilization is None

    # one-hot router probabilities have entropy 0
    one_hot = torch.nn.functional.one_hot(index[..., 0], 4).float()
    assert compute_stats(Routing.from_top_k(one_hot, one_hot, index, torch.ones(1, 4, 1))).router_entropy == (
        pytest.approx(0.0, abs=1e-6))


def test_the_table_of_a_block_called_on_its_own_names_its_row():
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=4)
    block(torch.randn(2, 4, 8, 8))
    table = convmoe.routing_stats(block).table()
    assert table.splitlines()[2].startswith("(the block itself)")
