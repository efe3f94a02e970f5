"""Auxiliary-loss-free bias balancing (MoEConfig.bias_balancing; Wang et al., 2024, arXiv:2408.15664)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import convmoe
from convmoe import MoEConfig, MoEConv2d, Routing
from convmoe.diagnostics import compute_stats
from convmoe.routers import ExpertChoiceRouter, PositionalRouter, TokenChoiceRouter
from convmoe.routers.bias_balancing import bias_update, dispatched_load
from convmoe.tokens import create_tokens


def _fixed_router(probs: list[float], top_k: int, bias: list[float], **kwargs) -> TokenChoiceRouter:
    """A router whose every token has router probabilities ``probs`` (zero gate weights, log-prob bias)."""
    router = TokenChoiceRouter(2, num_experts=len(probs), top_k=top_k, bias_balancing=0.1, **kwargs)
    with torch.no_grad():
        router.gate.proj.weight.zero_()
        router.gate.proj.bias.copy_(torch.tensor(probs).log())
        router.expert_bias.copy_(torch.tensor(bias))
    return router


def _tokens(batch: int = 1, side: int = 2):
    return create_tokens("pixel").split(torch.randn(batch, 2, side, side))


def test_selection_uses_the_bias_and_weights_the_unbiased_probabilities():
    # probs [0.5, 0.3, 0.2]; bias [0, 0.25, 0] -> scores [0.5, 0.55, 0.2]: experts 1 then 0, weighted
    # by the unbiased probabilities 0.3 and 0.5 renormalised: 0.375 and 0.625.
    router = _fixed_router([0.5, 0.3, 0.2], top_k=2, bias=[0.0, 0.25, 0.0]).eval()
    routing = router(_tokens())
    assert routing.expert_index[0].tolist() == [[1, 0]] * 4
    torch.testing.assert_close(routing.combine_weight[0], torch.tensor([[0.375, 0.625]] * 4))
    torch.testing.assert_close(routing.probs[0], torch.tensor([[0.5, 0.3, 0.2]] * 4))
    assert routing.expert_bias.tolist() == [0.0, 0.25, 0.0]
    # top-1: the bias alone flips the choice; the single weight is 1 (0.3 / 0.3)
    top1 = _fixed_router([0.5, 0.3, 0.2], top_k=1, bias=[0.0, 0.25, 0.0]).eval()(_tokens())
    assert top1.expert_index.flatten().tolist() == [1] * 4
    assert top1.combine_weight.flatten().tolist() == [1.0] * 4


def test_expert_dropout_keeps_dropped_experts_out_whatever_their_bias():
    router = _fixed_router([0.5, 0.3, 0.2], top_k=1, bias=[0.0, 5.0, 0.0]).eval()
    routing = router(_tokens(), expert_mask=torch.tensor([True, False, True]))
    assert routing.expert_index.flatten().tolist() == [0] * 4


def test_update_rule_by_hand():
    # mean load 2: the overloaded expert goes down, the underloaded up, the one at the mean stays
    assert bias_update(torch.tensor([3.0, 1.0, 2.0]), 0.1).tolist() == pytest.approx([-0.1, 0.1, 0.0])
    # experts removed by expert dropout: unchanged and out of the mean (kept loads [3, 1] -> mean 2)
    update = bias_update(torch.tensor([3.0, 0.0, 1.0]), 0.1, torch.tensor([True, False, True]))
    assert update.tolist() == pytest.approx([-0.1, 0.0, 0.1])


def test_one_training_step_moves_the_bias_by_the_sign_of_the_load_gap():
    # every token picks expert 0 (probs [0.6, 0.3, 0.1], no bias): loads [4, 0, 0], mean 4/3
    router = _fixed_router([0.6, 0.3, 0.1], top_k=1, bias=[0.0, 0.0, 0.0]).train()
    routing = router(_tokens())
    assert dispatched_load(routing).tolist() == [4.0, 0.0, 0.0]
    assert routing.expert_bias.tolist() == [0.0, 0.0, 0.0]  # the bias it selected with
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    # top-2 over [0.6, 0.3, 0.1] from bias [-0.1, 0.1, 0.1]: scores [0.5, 0.4, 0.2] -> loads [4, 4, 0], mean 8/3
    router(_tokens())
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]) + torch.tensor([-0.1, 0.1, 0.1]))


def test_a_tie_with_the_mean_load_leaves_the_bias_unchanged():
    # a balanced top-1 routing (3 tokens, 3 experts, one each): every load equals the mean, no bias moves
    router = TokenChoiceRouter(3, num_experts=3, top_k=1, bias_balancing=0.5).train()
    with torch.no_grad():
        router.gate.proj.weight.copy_(torch.eye(3) * 10)
        router.gate.proj.bias.zero_()
    x = torch.eye(3).reshape(1, 3, 1, 3)  # token t's feature t is 1: token t picks expert t
    routing = router(create_tokens("pixel").split(x))
    assert dispatched_load(routing).tolist() == [1.0, 1.0, 1.0]
    assert router.expert_bias.tolist() == [0.0, 0.0, 0.0]


def test_dropped_slots_do_not_count_as_load():
    # capacity 1 per expert and image: 4 tokens all want expert 0, one is kept, three are dropped
    router = _fixed_router([0.6, 0.3, 0.1], top_k=1, bias=[0.0, 0.0, 0.0], capacity_factor=0.5).train()
    routing = router(_tokens())
    assert routing.capacity == 1
    assert int(routing.dropped.sum()) == 3
    assert dispatched_load(routing).tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))


def _skewed_batch(generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(4, 4, 5, 5, generator=generator)
    x[:, 0] += 2.0  # channel 0 drives most pixels to one expert
    return x


def _imbalance_after_training(gamma: float, steps: int = 300) -> float:
    torch.manual_seed(0)
    block = MoEConv2d(4, 4, 1, num_experts=4, top_k=1, bias_balancing=gamma, losses={}).train()
    with torch.no_grad():
        block.router.gate.proj.weight.normal_(0, 0.1)
        block.router.gate.proj.weight[0, 0] = 1.0  # expert 0 wins when channel 0 is high
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        block(_skewed_batch(generator))
    block.eval()
    block(_skewed_batch(torch.Generator().manual_seed(1)))
    return compute_stats(block.last_routing).imbalance


def test_bias_balancing_lowers_the_imbalance_of_a_skewed_input():
    without = _imbalance_after_training(0.0)
    with_bias = _imbalance_after_training(0.01)
    assert without > 3.8  # total collapse on expert 0 is E = 4
    assert with_bias < 1.5
    assert with_bias < without - 1.0


def test_the_bias_is_state_and_survives_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model = convmoe.create_model("timm:test_resnet", num_classes=10)
    convmoe.patch(model, targets="layer4.*.conv2", config=MoEConfig(num_experts=4, top_k=1, bias_balancing=0.05))
    model.train()
    for _ in range(3):
        model(torch.randn(2, 3, 32, 32))
    name, block = next(iter(convmoe.moe_blocks(model)))
    bias = block.router.expert_bias.clone()
    assert bias.abs().sum() > 0
    assert f"{name}.router.expert_bias" in model.state_dict()
    loaded = convmoe.from_pretrained(convmoe.save_pretrained(model.eval(), tmp_path / "saved"))
    assert torch.equal(dict(convmoe.moe_blocks(loaded))[name].router.expert_bias, bias)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))


def test_no_update_in_eval_or_without_autograd():
    router = _fixed_router([0.6, 0.3, 0.1], top_k=1, bias=[0.0, 0.0, 0.0])
    router.eval()(_tokens())
    with torch.no_grad():
        router.train()(_tokens())
    assert router.expert_bias.tolist() == [0.0, 0.0, 0.0]


def test_gamma_zero_keeps_todays_routing_and_state():
    torch.manual_seed(0)
    plain = MoEConv2d(4, 8, 3, padding=1, num_experts=4, top_k=2, tokens="grid:3x3").train()
    assert plain.router.expert_bias is None
    assert not any("expert_bias" in key for key in plain.state_dict())
    x = torch.randn(2, 4, 9, 9)
    y = plain(x)
    routing = plain.last_routing
    top = routing.probs.topk(2, dim=-1)
    assert torch.equal(routing.expert_index, top.indices)
    assert torch.equal(routing.combine_weight, top.values / top.values.sum(-1, keepdim=True))
    # a zero bias selects as no bias does: same outputs, bit for bit
    biased = MoEConv2d(4, 8, 3, padding=1, num_experts=4, top_k=2, tokens="grid:3x3", bias_balancing=0.1).train()
    biased.load_state_dict({**plain.state_dict(), "router.expert_bias": torch.zeros(4)})
    assert torch.equal(biased(x), y)
    assert compute_stats(routing).expert_bias is None


def test_routing_stats_show_the_bias():
    block = MoEConv2d(4, 4, 1, num_experts=4, top_k=1, bias_balancing=0.1, router="positional",
                      tokens="grid:2x2").train()
    assert isinstance(block.router, PositionalRouter)
    block(torch.randn(2, 4, 6, 6))
    block(torch.randn(2, 4, 6, 6))
    stats = convmoe.routing_stats(block)
    expected = block.last_routing.expert_bias.tolist()
    assert stats[""].expert_bias == pytest.approx(expected)
    assert any(b != 0 for b in expected)  # the second pass selected with the first pass's update
    assert "expert bias" in stats.table()
    assert json.loads(json.dumps(stats[""].as_dict()))["expert_bias"] == stats[""].expert_bias
    assert stats.summary()["blocks"] == 1


def test_torch_compile_updates_the_bias_as_eager():
    torch.manual_seed(0)
    block = MoEConv2d(4, 4, 1, num_experts=4, top_k=1, bias_balancing=0.1, dispatcher="dense").train()
    compiled_block = MoEConv2d(4, 4, 1, num_experts=4, top_k=1, bias_balancing=0.1, dispatcher="dense").train()
    compiled_block.load_state_dict(block.state_dict())
    compiled = torch.compile(compiled_block, backend="aot_eager")
    for seed in range(3):
        x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(compiled(x), block(x))
    assert torch.equal(compiled_block.router.expert_bias, block.router.expert_bias)
    assert block.router.expert_bias.abs().sum() > 0


def test_single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        router = _fixed_router([0.6, 0.3, 0.1], top_k=1, bias=[0.0, 0.0, 0.0]).train()
        router(_tokens())
        torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("value", "error", "message"), [
    (-0.1, ValueError, r"bias_balancing=-0\.1 must be >= 0; e\.g\. 0\.001, or 0\.0 to turn it off\."),
    (math.inf, ValueError, r"bias_balancing=inf must be a finite number"),
    (math.nan, ValueError, r"bias_balancing=nan must be a finite number"),
    ("0.1", TypeError, r"bias_balancing='0\.1' \(str\) must be a number"),
    (True, TypeError, r"bias_balancing=True \(bool\) must be a number"),
])
def test_config_validation(value, error, message):
    with pytest.raises(error, match=message):
        MoEConfig(bias_balancing=value)


@pytest.mark.parametrize("router", ["expert_choice", ExpertChoiceRouter])
def test_expert_choice_refuses_bias_balancing(router):
    with pytest.raises(ValueError, match=r"bias_balancing=0\.01 does not apply to router='expert_choice' \(it balances "
                                         r"load by construction\); set bias_balancing=0\.0 or use router='token_choice'"):
        MoEConfig(router=router, bias_balancing=0.01)
    assert MoEConfig(router=router, bias_balancing=0.0).bias_balancing == 0.0
    with pytest.raises(ValueError, match="bias_balancing does not apply to expert-choice routing"):
        ExpertChoiceRouter(4, num_experts=4, bias_balancing=0.01)


def test_config_round_trip_and_old_configs():
    config = MoEConfig(num_experts=4, top_k=1, bias_balancing=0.001)
    assert MoEConfig.from_json(config.to_json()) == config
    old = MoEConfig().to_dict()
    del old["bias_balancing"]
    assert MoEConfig.from_dict(old).bias_balancing == 0.0


def test_hand_made_routing_load_counts_every_slot():
    routing = Routing.from_top_k(torch.zeros(1, 2, 3), torch.full((1, 2, 3), 1 / 3),
                                 torch.tensor([[[0, 1], [0, 2]]]), torch.full((1, 2, 2), 0.5))
    assert dispatched_load(routing).tolist() == [2.0, 1.0, 1.0]
    assert bias_update(dispatched_load(routing), 0.25).tolist() == [-0.25, 0.25, 0.25]


def test_gradient_checkpointing_recomputes_with_the_bias_of_the_forward_pass():
    torch.manual_seed(0)
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=1, bias_balancing=0.5).train()
    with torch.no_grad():
        block.router.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.2, -0.1]))
    plain = copy.deepcopy(block)
    x = torch.randn(2, 4, 7, 7)
    y = checkpoint(block, x, use_reentrant=False)
    y.square().mean().backward()
    y_plain = plain(x)
    y_plain.square().mean().backward()
    assert torch.equal(y, y_plain)
    assert torch.equal(block.router.expert_bias, plain.router.expert_bias)  # updated once, not again in backward
    for p, q in zip(block.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_static_dispatch_with_a_bias_compiles_to_one_graph(train):
    block = MoEConv2d(4, 4, 1, num_experts=4, top_k=1, bias_balancing=0.1, dispatcher="dense", losses={}).train(train)
    block(torch.randn(2, 4, 5, 5))  # a call outside the trace first (in training: an update, a kept selection bias)
    explained = torch._dynamo.explain(block)(torch.randn(2, 4, 5, 5))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_export_in_eval_keeps_the_bias_and_the_outputs():
    torch.manual_seed(0)
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=2, bias_balancing=0.1)
    with torch.no_grad():
        block.router.expert_bias.copy_(torch.tensor([0.2, -0.2, 0.1, 0.0]))
    block.eval()
    x = torch.randn(2, 4, 7, 7)
    exported = torch.export.export(block, (x,))
    torch.testing.assert_close(exported.module()(x), block(x))
    assert block.router.expert_bias.tolist() == pytest.approx([0.2, -0.2, 0.1, 0.0])
