"""Balancing losses against values computed by hand, and the block's weighting of them."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_block
from torch import Tensor

from convmoe import LOSSES, MoEConfig, Routing
from convmoe.losses import BalancingLoss, diversity_loss, importance_loss, switch_loss, z_loss

# 4 tokens, 3 experts. First choices: 0, 1, 0, 2.
PROBS = torch.tensor([
    [0.7, 0.2, 0.1],
    [0.1, 0.6, 0.3],
    [0.5, 0.3, 0.2],
    [0.2, 0.2, 0.6],
])


def test_switch_loss_by_hand() -> None:
    # f = share of first choices = [2/4, 1/4, 1/4]
    # P = mean probability = [(0.7+0.1+0.5+0.2)/4, (0.2+0.6+0.3+0.2)/4, (0.1+0.3+0.2+0.6)/4] = [0.375, 0.325, 0.3]
    # E * sum(f * P) = 3 * (0.5*0.375 + 0.25*0.325 + 0.25*0.3) = 3 * 0.34375
    expected = 3 * (0.5 * 0.375 + 0.25 * 0.325 + 0.25 * 0.3)
    assert float(switch_loss(PROBS, 3)) == pytest.approx(expected)
    # (B, N, E) is flattened over batch and tokens
    assert float(switch_loss(PROBS.reshape(2, 2, 3), 3)) == pytest.approx(expected)


def test_switch_loss_extremes_and_gradient() -> None:
    assert float(switch_loss(torch.full((6, 3), 1 / 3), 3)) == pytest.approx(1.0)  # argmax ties -> expert 0
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 5)
    assert float(switch_loss(collapsed, 3)) == pytest.approx(3.0)
    # only P carries gradient: d loss / d p[t, i] = E * f_i / T
    probs = PROBS.clone().requires_grad_()
    switch_loss(probs, 3).backward()
    expected_grad = (3 * torch.tensor([0.5, 0.25, 0.25]) / 4).expand(4, 3)
    torch.testing.assert_close(probs.grad, expected_grad)


def test_importance_loss_by_hand() -> None:
    # importance = column sums = [1.5, 1.3, 1.2], mean 4/3
    # deviations [1/6, -1/30, -2/15], squares [25/900, 1/900, 16/900]: population variance (42/900)/3 = 7/450
    # loss = var / mean^2 = (7/450) / (16/9) = 63/7200
    assert float(importance_loss(PROBS)) == pytest.approx(63 / 7200)
    assert float(importance_loss(torch.full((4, 3), 1 / 3))) == pytest.approx(0.0, abs=1e-7)
    # all importance on one of two experts: importance [2, 0], mean 1, variance 1 -> 1
    assert float(importance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))) == pytest.approx(1.0)


def test_z_loss_by_hand() -> None:
    # logsumexp([0, 0]) = log 2; logsumexp([log 3, 0]) = log(3 + 1) = log 4
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert float(z_loss(logits)) == pytest.approx(expected)
    assert float(z_loss(logits.reshape(1, 2, 2).half())) == pytest.approx(expected, rel=1e-3)  # computed in float32
    assert z_loss(logits.half()).dtype == torch.float32


def test_diversity_loss_by_hand() -> None:
    # profiles (columns) [0.6, 0.2] and [0.4, 0.8]: cos = 0.4 / (sqrt(0.4) * sqrt(0.8)) = 1 / sqrt(2);
    # mean over the 2 ordered pairs i != j is cos itself
    probs = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    assert float(diversity_loss(probs)) == pytest.approx(1 / math.sqrt(2))
    # profiles [1, 0, 1], [0, 1, 1], [0, 0, 0]: cos(0, 1) = 1/2, the empty profile 0;
    # off-diagonal sum 2 * 1/2 over E * (E - 1) = 6 pairs -> 1/6
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert float(diversity_loss(probs)) == pytest.approx(1 / 6)
    assert float(diversity_loss(torch.eye(3))) == pytest.approx(0.0)  # disjoint experts
    assert float(diversity_loss(torch.full((5, 4), 0.25))) == pytest.approx(1.0)  # identical experts
    assert float(diversity_loss(torch.ones(5, 1))) == 0.0  # one expert: no pair


def routing_from(probs: Tensor, logits: Tensor | None = None) -> Routing:
    logits = probs.log() if logits is None else logits
    index = probs.argmax(-1, keepdim=True)
    return Routing.from_top_k(logits[None], probs[None], index[None], torch.ones_like(index, dtype=torch.float)[None])


def test_balancing_loss_weights_and_sums_the_terms() -> None:
    weights = {"switch": 0.01, "importance": 0.5, "z": 0.001, "diversity": 0.1}
    logits = PROBS.log() + 0.3  # logsumexp is log(1) + 0.3 = 0.3 for every token
    aux = BalancingLoss(weights)(routing_from(PROBS, logits))
    expected_terms = {
        "switch": 3 * (0.5 * 0.375 + 0.25 * 0.325 + 0.25 * 0.3),
        "importance": 63 / 7200,
        "z": 0.3 ** 2,
        "diversity": float(diversity_loss(PROBS)),
    }
    assert set(aux.terms) == set(weights)
    for name, value in expected_terms.items():
        assert float(aux.terms[name]) == pytest.approx(value, rel=1e-5), name
    assert float(aux.total) == pytest.approx(sum(weights[n] * v for n, v in expected_terms.items()), rel=1e-5)
    assert aux.weights == weights


def test_z_loss_ignores_experts_removed_by_dropout() -> None:
    logits = torch.tensor([[0.0, float("-inf"), 0.0], [math.log(3.0), float("-inf"), 0.0]])
    probs = torch.softmax(logits, -1)
    aux = BalancingLoss({"z": 1.0})(routing_from(probs, logits))
    assert float(aux.terms["z"]) == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_no_losses_is_a_zero_total() -> None:
    aux = BalancingLoss({})(routing_from(PROBS))
    assert aux.terms == {}
    assert float(aux.total) == 0.0


def test_block_aux_total_backpropagates_to_the_router(x_small: Tensor) -> None:
    block = make_block(tokens="grid:3x3", losses={"switch": 1.0, "z": 0.1, "importance": 1.0, "diversity": 1.0})
    block(x_small)
    block.last_aux.total.backward()
    assert block.router.gate.proj.weight.grad.abs().sum() > 0
    assert block.experts.weight.grad is None  # the losses see only the router


def test_unknown_loss_name_raises() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'swich'; available: diversity, importance, switch, switch_global, z "
                                         r"\(did you mean 'switch'\?\)"):
        BalancingLoss({"swich": 0.01})
    with pytest.raises(ValueError, match=r"unknown loss 'zloss'"):
        MoEConfig(losses={"zloss": 0.01})
    with pytest.raises(ValueError, match=r"loss weight for 'switch' must be >= 0, got -1"):
        MoEConfig(losses={"switch": -1})


@pytest.mark.usefixtures("isolated_registries")
def test_user_registered_loss(x_small: Tensor) -> None:
    LOSSES.register("mean_top_prob")(lambda routing: routing.probs.amax(-1).mean())
    block = make_block(tokens="patch:4", losses={"mean_top_prob": 2.0, "switch": 0.0})
    block(x_small)
    expected = block.last_routing.probs.amax(-1).mean()
    torch.testing.assert_close(block.last_aux.total.detach(), 2.0 * expected)
