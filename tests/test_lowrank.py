"""Low-rank experts (experts="lowrank"): exact upcycling, routed gradients, active FLOPs, folding, options."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from conftest import TOKEN_SPECS, assert_matches_dense_dispatch, max_abs_diff
from torch import Tensor, nn

import convmoe
from convmoe import MoEConfig, MoEConv2d
from convmoe.describe import summarize_block
from convmoe.dispatch import SparseDispatcher, every_pair
from convmoe.dispatch.regions import run_regions
from convmoe.experts import LowRankExperts
from convmoe.geometry import ConvGeometry
from convmoe.patch.unpatch import fold_block

LOWRANK = {"experts": "lowrank", "expert_kwargs": {"rank": 4}}
CONVS = {
    "3x3": lambda: nn.Conv2d(8, 12, 3, padding=1),
    "strided_dilated_no_bias": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, bias=False),
    "1x1": lambda: nn.Conv2d(8, 12, 1),
    "even_same_reflect": lambda: nn.Conv2d(8, 12, 2, padding="same", padding_mode="reflect"),
}
DISPATCHERS = ["dense", "sparse", "sparse:gathered", "sparse:regions", "sparse:deltas"]


def _randomize_deltas(block: MoEConv2d) -> MoEConv2d:
    with torch.no_grad():
        block.experts.up.copy_(torch.randn_like(block.experts.up) * 0.3)
    return block


@pytest.mark.parametrize("conv_name", list(CONVS))
@pytest.mark.parametrize("tokens", TOKEN_SPECS)
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_upcycled_low_rank_block_is_exactly_the_conv(conv_name: str, tokens: str, dispatcher: str) -> None:
    torch.manual_seed(0)
    conv = CONVS[conv_name]()
    block = MoEConv2d.from_conv(conv, num_experts=4, top_k=2, tokens=tokens, dispatcher=dispatcher, noise_std=1.0,
                                **LOWRANK)
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        expected = conv(x)
        for mode in (block.eval(), block.train()):  # router noise in training changes the routing, not the output
            assert max_abs_diff(mode(x), expected) <= 1e-6
    assert torch.equal(block.experts.base_weight, conv.weight)


def test_upcycled_merged_path_is_exactly_the_conv() -> None:
    conv = nn.Conv2d(8, 12, 3, padding=1)
    block = MoEConv2d.from_conv(conv, num_experts=4, top_k=2, tokens="image", dispatcher="sparse:merged",
                                **LOWRANK).eval()
    x = torch.randn(3, 8, 7, 7)
    assert max_abs_diff(block(x), conv(x)) <= 1e-6


def test_patched_timm_model_is_unchanged_and_unpatch_base_restores_the_weights() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    convmoe.patch(model, targets="last_stage", config=MoEConfig(num_experts=4, top_k=2, **LOWRANK))
    assert "layer4.0.conv1" in dict(convmoe.moe_blocks(model))
    assert max_abs_diff(model(x), expected) <= 1e-5
    report = convmoe.unpatch(model, how="base", inputs=x)
    assert report.max_abs_diff <= 1e-5
    assert set(report.expert_weights["layer4.0.conv1"]) == {0.0}
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, original[name]), name


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("tokens", ["pixel", "grid:3x3", "image"])
def test_gradients_reach_every_routed_delta_and_no_other(dispatcher: str, tokens: str) -> None:
    torch.manual_seed(0)
    block = MoEConv2d.from_conv(nn.Conv2d(8, 12, 3, padding=1), num_experts=6, top_k=2, tokens=tokens,
                                dispatcher=dispatcher, losses={}, **LOWRANK).train()
    x = torch.randn(2, 8, 9, 9)
    # upcycled: up = 0, so (as with LoRA) only up gets a gradient on the first step, on every routed expert
    (block(x) * torch.randn(2, 12, 9, 9)).sum().backward()
    load = block.last_routing.expert_load()
    if tokens == "image":  # 2 images x top-2 of 6: some expert is unrouted, and must get no gradient
        assert bool((load == 0).any())
    up_grad = block.experts.up.grad.flatten(1).abs().sum(1)
    assert torch.equal(up_grad > 0, load > 0)
    assert float(block.experts.down.grad.abs().sum()) == 0.0
    # once up has moved, down gets one too; W0 always does
    block.zero_grad()
    _randomize_deltas(block)
    (block(x) * torch.randn(2, 12, 9, 9)).sum().backward()
    load = block.last_routing.expert_load()
    for name in ("up", "down"):
        per_expert = getattr(block.experts, name).grad.flatten(1).abs().sum(1)
        assert torch.equal(per_expert > 0, load > 0), name
    assert float(block.experts.base_weight.grad.abs().sum()) > 0
    assert float(sum(p.grad.abs().sum() for p in block.router.parameters())) > 0


def test_active_flops_at_most_1_10x_the_dense_conv_at_c256_r8_e8_k2() -> None:
    conv = nn.Conv2d(256, 256, 3, padding=1)
    block = MoEConv2d.from_conv(conv, num_experts=8, top_k=2, tokens="pixel", experts="lowrank",
                                expert_kwargs={"rank": 8}).eval()
    model = nn.Sequential(block)
    x = torch.randn(1, 256, 16, 16)
    counted = convmoe.flops(model, x).blocks["0"]
    positions = 16 * 16
    assert counted.dense == 256 * 256 * 9 * positions
    assert counted.base == counted.dense
    assert counted.experts == 2 * positions * 8 * (256 * 9 + 256)  # two rank-8 deltas per pixel
    ratio = counted.active / counted.dense
    assert 1.0 < ratio <= 1.10, ratio
    # the analytic summary (describe) agrees with fvcore's count
    summary = summarize_block("0", block, input_size=(16, 16))
    assert summary.active_flops_ratio == pytest.approx(ratio, rel=1e-3)
    # full-rank experts at the same routing pay about twice the conv
    full = MoEConv2d.from_conv(conv, num_experts=8, top_k=2, tokens="pixel").eval()
    assert convmoe.flops(nn.Sequential(full), x).blocks["0"].active / counted.dense > 1.95


def test_unpatch_usage_folds_one_routed_image_exactly() -> None:
    """One image token, batch 1: the usage weights are that image's combine weights, so the fold is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    convmoe.patch(model, targets="2", config=MoEConfig(num_experts=4, top_k=2, tokens="image", **LOWRANK))
    _randomize_deltas(model[2])
    x = torch.randn(1, 3, 9, 9)
    model.eval()
    with torch.no_grad():
        patched = model(x)
    report = convmoe.unpatch(model, how="usage", inputs=x)
    assert isinstance(model[2], nn.Conv2d)
    assert sorted(w > 0 for w in report.expert_weights["2"]) == [False, False, True, True]
    assert report.max_abs_diff <= 1e-5
    assert max_abs_diff(model(x), patched) <= 1e-5


def test_unpatch_average_is_w0_plus_the_mean_delta() -> None:
    torch.manual_seed(0)
    block = _randomize_deltas(MoEConv2d(4, 6, 3, padding=1, num_experts=3, **LOWRANK))
    experts = block.experts
    weight, bias = fold_block(block, torch.full((3,), 1 / 3))
    deltas = torch.einsum("eor,erikl->eoikl", experts.up * experts.scale, experts.down)
    torch.testing.assert_close(weight, experts.base_weight + deltas.mean(0))
    assert torch.equal(bias, experts.base_bias)


def test_unpatch_base_needs_a_shared_base() -> None:
    model = convmoe.patch(nn.Sequential(nn.Conv2d(3, 4, 3)), targets="0")
    with pytest.raises(ValueError, match=r"how='base'.*no shared base conv; use how='average' or 'usage'"):
        convmoe.unpatch(model, how="base")
    assert isinstance(model[0], MoEConv2d)  # nothing changed


@pytest.mark.parametrize(("size", "expected_convs"), [
    (8, [(32, 16, 3, 3)]),  # a large map: each image's W0 + sum_e w_e dW_e multiplied out, one conv
    (2, [(4 * 4, 16, 3, 3), (32, 16, 3, 3)]),  # a tiny map: every expert's r = 4 channels, then W0
])
def test_merged_path_folds_or_keeps_the_rank_by_cost(size: int, expected_convs: list[tuple[int, ...]]) -> None:
    """Image tokens: multiplying the factors out costs C_out * K * r per used expert once, running them
    factored B * positions * r * (K + C_out); the cheaper runs, and both equal the dense reference."""
    torch.manual_seed(0)
    block = _randomize_deltas(MoEConv2d(16, 32, 3, padding=1, num_experts=4, top_k=2, tokens="image", **LOWRANK))
    calls: list[tuple[int, ...]] = []
    original = torch.nn.functional.conv2d

    def record(x: Tensor, weight: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(tuple(weight.shape))
        return original(x, weight, *args, **kwargs)

    x = torch.randn(1, 16, size, size, requires_grad=True)
    assert block.dispatcher.choose_path(block.tokens.split(x), block.experts) == "merged"
    torch.nn.functional.conv2d = record
    try:
        y = block(x)
    finally:
        torch.nn.functional.conv2d = original
    assert calls == expected_convs
    assert_matches_dense_dispatch(block, x, y)


def test_scale_and_forward_segments_follow_the_definition() -> None:
    torch.manual_seed(0)
    experts = LowRankExperts(4, 6, num_experts=2, geometry=ConvGeometry.create(3), rank=2, alpha=6.0)
    with torch.no_grad():
        experts.up.normal_()
    assert experts.scale == 3.0
    windows = torch.randn(3, 4, 5, 5)
    out = experts.forward_segments(windows, [1, 2])
    for m, e in enumerate([0, 1, 1]):
        delta = torch.nn.functional.conv2d(windows[m:m + 1], experts.down[e])
        expected = 3.0 * torch.einsum("or,brhw->bohw", experts.up[e], delta)
        torch.testing.assert_close(out[m:m + 1], expected)
    torch.testing.assert_close(experts.forward_all(windows)[:, 1], experts.forward_segments(windows, [0, 3]))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"groups": 4}, r"ungrouped convs \(groups=1\), got groups=4.*use experts='conv' there"),
    ({"expert_kwargs": {"rank": 0}}, r"int rank >= 1, got rank=0"),
    ({"expert_kwargs": {"rank": 2.5}}, r"int rank >= 1, got rank=2.5"),
    ({"expert_kwargs": {"alpha": -1.0}}, r"alpha > 0 \(scale = alpha / rank\), got alpha=-1.0"),
    ({"expert_act": "relu"}, r"linear deltas on the shared conv; expert_norm=None and expert_act='relu' must be None"),
    ({"shared_expert": True}, r"shared_expert=True with LowRankExperts experts.*set shared_expert=False"),
])
def test_bad_options_get_one_line_errors(kwargs: dict[str, Any], match: str) -> None:
    options = {"experts": "lowrank", **kwargs}
    groups = options.pop("groups", 1)
    with pytest.raises(ValueError, match=match) as error:
        MoEConv2d(8, 8, 3, padding=1, groups=groups, **options)
    assert "\n" not in str(error.value)


def test_freeze_base_trains_the_deltas_and_keeps_w0_frozen() -> None:
    model = timm.create_model("test_resnet", num_classes=5)
    convmoe.patch(model, targets="last_stage", config=MoEConfig(num_experts=4, top_k=1, **LOWRANK))
    summary = convmoe.freeze_base(model, train="fc")
    trainable = set(summary.trainable)
    for name, _ in convmoe.moe_blocks(model):
        assert {f"{name}.experts.down", f"{name}.experts.up"} <= trainable
        assert f"{name}.experts.base_weight" not in trainable
        assert any(n.startswith(f"{name}.router.") for n in trainable)
    assert "fc.weight" in trainable
    # the pretrained conv stays frozen: the trainable share is small
    assert summary.trainable_params < 0.2 * summary.all_params


def test_config_round_trip_rebuilds_the_same_block() -> None:
    block = _randomize_deltas(MoEConv2d(8, 8, 3, padding=1, num_experts=4, experts="lowrank",
                                        expert_kwargs={"rank": 3, "alpha": 1.5}))
    again = MoEConv2d(8, 8, 3, padding=1, config=MoEConfig.from_dict(block.config.to_dict()))
    again.load_state_dict(block.state_dict())
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(again.eval()(x), block.eval()(x))
    assert "rank=3, alpha=1.5" in repr(block.experts)


def test_sparse_paths_choose_the_factored_kernels() -> None:
    block = MoEConv2d(8, 8, 3, padding=1, **LOWRANK)
    x = torch.randn(1, 8, 9, 9)
    for tokens, path in (("pixel", "gathered"), ("patch:2", "gathered"), ("grid:3x3", "regions"),
                         ("image", "merged")):  # 8 experts x rank 4 = 32 down channels > 8 + 8 channels
        assert SparseDispatcher().choose_path(convmoe.create_tokens(tokens).split(x), block.experts) == path
    small = MoEConv2d(8, 8, 3, padding=1, num_experts=4, experts="lowrank", expert_kwargs={"rank": 2})
    for tokens, path in (("pixel", "deltas"), ("grid:3x3", "deltas"), ("image", "merged")):  # 8 <= 16 channels
        assert SparseDispatcher().choose_path(convmoe.create_tokens(tokens).split(x), small.experts) == path
    with pytest.raises(ValueError, match=r"sparse path 'deltas' needs factored experts \(experts='lowrank'\)"):
        MoEConv2d(8, 8, 3, dispatcher="sparse:deltas")(x)


class _RoutedOnly(nn.Module):
    """A user's dispatcher that knows nothing of shared bases: every expert on every region, weighted."""

    def forward(self, x_pad: Tensor, tokens: Any, routing: Any, experts: Any, out_size: tuple[int, int]) -> Tensor:
        return run_regions(x_pad, tokens, every_pair(routing), experts, out_size)


@pytest.mark.parametrize("tokens", ["pixel", "image"])
def test_the_block_adds_w0_for_a_dispatcher_that_does_not(tokens: str) -> None:
    torch.manual_seed(0)
    block = _randomize_deltas(MoEConv2d(8, 8, 3, padding=1, num_experts=4, tokens=tokens, **LOWRANK)).eval()
    x = torch.randn(2, 8, 7, 7)
    expected = block(x)
    block.dispatcher = _RoutedOnly()
    assert max_abs_diff(block(x), expected) <= 1e-5
