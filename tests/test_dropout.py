"""MEDoE expert dropout: exact counts, no effect in eval, dropped experts get nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import TOKEN_SPECS, default_top_k, make_block
from torch import Tensor

from convmoe import DROPOUTS, MoEConfig, create_dropout, routing_stats
from convmoe.dropout import MEDoEDropout

CPU = torch.device("cpu")


@pytest.mark.parametrize(("drop_rate", "num_experts", "top_k", "expected"), [
    (0.25, 8, 2, 2),
    (0.3, 8, 2, 2),     # round(2.4)
    (0.4, 8, 2, 3),     # round(3.2)
    (0.45, 8, 1, 4),    # round(3.6)
    (0.9, 4, 2, 2),     # round(3.6) = 4, capped at E - top_k = 2
    (0.75, 4, 1, 3),
    (0.1, 4, 1, 0),     # round(0.4)
    (0.0, 8, 2, 0),
])
def test_medoe_drops_exactly_round_rate_times_experts(drop_rate: float, num_experts: int, top_k: int,
                                                      expected: int) -> None:
    policy = MEDoEDropout(drop_rate)
    assert policy.num_dropped(num_experts, top_k) == expected
    for _ in range(5):
        mask = policy.train()(num_experts, top_k, CPU)
        if expected == 0:
            assert mask is None
        else:
            assert mask.dtype == torch.bool
            assert mask.shape == (num_experts,)
            assert int((~mask).sum()) == expected
    assert policy.eval()(num_experts, top_k, CPU) is None


def test_medoe_draws_every_subset_uniformly() -> None:
    # 0.5 of 8 experts: 4 dropped per pass, each of the C(8, 4) = 70 subsets equally likely, so every
    # expert is dropped half the time.
    torch.manual_seed(0)
    policy = MEDoEDropout(0.5).train()
    masks = torch.stack([policy(8, 2, CPU) for _ in range(4000)])
    assert set((~masks).sum(dim=1).tolist()) == {4}
    assert len({tuple(mask.tolist()) for mask in masks}) == 70
    dropped = (~masks).float().mean(dim=0)
    assert torch.all((dropped - 0.5).abs() < 0.04), dropped  # 0.04 is > 5 binomial standard deviations


@pytest.mark.parametrize("tokens", TOKEN_SPECS)
@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "positional"])
def test_dropped_experts_get_no_token_and_zero_probability(router: str, tokens: str, x_small: Tensor) -> None:
    block = make_block(router=router, tokens=tokens, num_experts=8, top_k=default_top_k(router), dropout="medoe",
                       drop_rate=0.25, noise_std=0.5).train()
    block(x_small)
    routing = block.last_routing
    mask = routing.expert_mask
    assert mask is not None
    assert int((~mask).sum()) == 2
    assert (routing.probs[..., ~mask] == 0).all()
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(routing.probs.shape[:-1]))
    assert (routing.dense_weights()[..., ~mask] == 0).all()
    assert (routing.expert_load()[~mask] == 0).all()
    # the kept experts' probabilities are the softmax over the kept logits alone
    torch.testing.assert_close(routing.probs[..., mask], torch.softmax(routing.logits[..., mask], dim=-1))
    kept = routing.combine_weight.sum(-1)[~routing.dropped]
    torch.testing.assert_close(kept, torch.ones_like(kept))

    stats = next(iter(routing_stats(block).blocks.values()))
    assert stats.medoe_expert_utilization is not None
    assert 0 < stats.medoe_expert_utilization <= 1
    assert stats.medoe_expert_entropy is not None
    assert 0 <= stats.medoe_expert_entropy <= 1 + 1e-6
    assert set(stats.dead_experts) >= set((~mask).nonzero().flatten().tolist())


def test_no_dropout_in_eval(x_small: Tensor) -> None:
    block = make_block(tokens="pixel", num_experts=8, dropout="medoe", drop_rate=0.5).eval()
    block(x_small)
    assert block.last_routing.expert_mask is None
    stats = next(iter(routing_stats(block).blocks.values()))
    assert stats.medoe_expert_utilization is None
    assert stats.medoe_expert_entropy is None


def test_dropout_in_training_changes_the_output(x_small: Tensor) -> None:
    block = make_block(tokens="grid:3x3", num_experts=8, dropout="medoe", drop_rate=0.5)
    reference = block.eval()(x_small)
    block.train()
    outputs = [block(x_small) for _ in range(4)]
    assert any(not torch.allclose(y, reference) for y in outputs)


def test_medoe_stats_by_hand(x_small: Tensor) -> None:
    block = make_block(tokens="pixel", num_experts=8, top_k=2, dropout="medoe", drop_rate=0.25).train()
    block(x_small)
    routing, stats = block.last_routing, next(iter(routing_stats(block).blocks.values()))
    load = routing.expert_load()[routing.expert_mask]
    assert stats.medoe_expert_utilization == pytest.approx(float((load > 0).float().mean()))
    share = load[load > 0] / load.sum()
    assert stats.medoe_expert_entropy == pytest.approx(float(-(share * share.log()).sum() / torch.log(torch.tensor(6.0))))


def test_dropout_config_validation() -> None:
    with pytest.raises(ValueError, match=r"drop_rate=0.2 has no effect without a dropout policy; set dropout='medoe'"):
        MoEConfig(drop_rate=0.2)
    with pytest.raises(ValueError, match=r"drop_rate=1.0 must be in \[0, 1\)"):
        MoEConfig(dropout="medoe", drop_rate=1.0)
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\), got -0.1"):
        MEDoEDropout(-0.1)
    with pytest.raises(ValueError, match=r"unknown expert dropout 'medo'; available: medoe \(did you mean 'medoe'\?\)"):
        MoEConfig(dropout="medo")


def test_create_dropout() -> None:
    assert create_dropout(None) is None
    assert isinstance(create_dropout("medoe", drop_rate=0.2), MEDoEDropout)
    assert DROPOUTS.names() == ["medoe"]
