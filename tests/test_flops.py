"""convmoe.flops: active FLOPs from the routing, the dense equivalent from fvcore, a per-module table."""

from __future__ import annotations

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

import convmoe
from convmoe import MoEConv2d, Routing
from convmoe.flops import block_flops, flops


def fvcore_total(model: nn.Module, x: torch.Tensor) -> int:
    analysis = FlopCountAnalysis(model, (x,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())


def test_block_active_flops_match_a_hand_count_for_a_known_routing() -> None:
    # 9x9 output, grid:2x2 -> token rows of 4 and 5, columns of 4 and 5: 16, 20, 20, 25 positions
    block = MoEConv2d(4, 6, 3, padding=1, num_experts=4, top_k=2, tokens="grid:2x2").eval()
    x = torch.randn(2, 4, 9, 9)
    expert_index = torch.tensor([[[0, 1], [2, 3], [1, 2], [0, 3]], [[3, 2], [1, 0], [0, 2], [1, 3]]])
    slot_mask = torch.tensor([[[True, True], [True, False], [False, False], [True, True]],
                              [[False, True], [True, True], [True, False], [False, False]]])
    probs = torch.full((2, 4, 4), 0.25)
    routing = Routing(logits=probs.log(), probs=probs, expert_index=expert_index,
                      combine_weight=slot_mask.float() / 2, slot_mask=slot_mask, dropped=~slot_mask.any(-1),
                      capacity=2)
    counted = block_flops(block, x, routing)

    positions = torch.tensor([16, 20, 20, 25])
    per_position = 6 * 4 * 3 * 3  # C_out * C_in * kh * kw multiply-adds
    expected_experts = int((slot_mask.sum(-1) * positions).sum()) * per_position
    assert counted.experts == expected_experts == (2 * 16 + 20 + 2 * 25 + 1 * 16 + 2 * 20 + 20) * per_position
    assert counted.gate == 2 * 4 * 4 * 4  # B * N tokens, a 4 -> 4 linear gate
    assert counted.shared == 0
    assert counted.active == counted.gate + counted.experts
    assert counted.dense == 2 * 81 * per_position
    assert counted.all_experts == 4 * counted.dense  # E experts on every position
    assert counted.dispatched_slots == int(slot_mask.sum())
    assert counted.tokens == 8


@pytest.mark.parametrize("tokens", ["pixel", "grid:3x3", "patch:4", "image"])
@pytest.mark.parametrize("conv_kwargs", [{"kernel_size": 3, "padding": 1}, {"kernel_size": 3, "stride": 2, "padding": 1},
                                         {"kernel_size": (1, 3), "padding": (0, 1), "groups": 2}])
def test_top_k_routing_without_capacity_costs_k_dense_convs(tokens: str, conv_kwargs: dict) -> None:
    conv = nn.Conv2d(4, 8, **conv_kwargs)
    block = MoEConv2d.from_conv(conv, num_experts=4, top_k=2, tokens=tokens).eval()
    x = torch.randn(2, 4, 11, 10)
    report = flops(block, x)
    counted = report.blocks[""]
    assert counted.dense == fvcore_total(conv, x)
    assert counted.experts == 2 * counted.dense
    assert report.active == counted.active == counted.gate + 2 * counted.dense


def test_shared_expert_adds_one_dense_conv() -> None:
    block = MoEConv2d(4, 8, 3, padding=1, num_experts=4, top_k=1, tokens="patch:4", shared_expert=True).eval()
    counted = flops(block, torch.randn(1, 4, 8, 8)).blocks[""]
    assert counted.shared == counted.dense == 8 * 4 * 9 * 64
    assert counted.active == counted.gate + counted.experts + counted.shared


def test_model_report_counts_the_rest_with_fvcore_and_the_dense_equivalent_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    dense_total = fvcore_total(model, x)
    dense_params = sum(p.numel() for p in model.parameters())

    model[3] = MoEConv2d.from_conv(model[3], num_experts=4, top_k=2, tokens="grid:2x2")
    model[5][0] = MoEConv2d.from_conv(model[5][0], num_experts=4, top_k=1, tokens="pixel", shared_expert=True)
    model.eval()
    report = flops(model, x)

    assert report.dense == dense_total
    assert report.dense_params == dense_params
    assert report.params == sum(p.numel() for p in model.parameters())
    # outside the blocks fvcore counts as usual; each block adds its active count
    rest = dense_total - report.blocks["3"].dense - report.blocks["5.0"].dense
    assert report.active == rest + report.blocks["3"].active + report.blocks["5.0"].active
    assert report.by_module[""] == report.active
    assert report.by_module["5"] == report.by_module["5.0"] == report.blocks["5.0"].active
    assert report.by_module["3.experts"] == report.blocks["3"].experts
    assert report.by_module["5.0.shared_expert"] == report.blocks["5.0"].shared
    assert report.by_module["0"] == report.dense_by_module["0"] == 3 * 8 * 9 * 16 * 16 * 2
    # the model is left as it was: its blocks are back in place
    assert isinstance(model[3], MoEConv2d)
    assert isinstance(model[5][0], MoEConv2d)


def test_table_lists_the_blocks_and_their_parts() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), MoEConv2d(4, 4, 3, padding=1, num_experts=2, top_k=1)).eval()
    report = convmoe.flops(model, torch.randn(1, 3, 6, 6))
    table = report.table()
    lines = {line.split("|")[0].strip(): line for line in table.splitlines()}
    for name in ("model", "0", "1", "1.router", "1.experts"):
        assert name in lines
    assert "fused multiply-add = one flop" in table
    assert "1.router.gate" not in lines  # inside a block only its main parts
    assert report.table(max_depth=1).count("1.experts") == 0


def test_a_block_called_twice_is_counted_twice() -> None:
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=2, top_k=1)
    model = nn.Sequential(block, nn.ReLU(), block).eval()
    report = flops(model, torch.randn(1, 4, 6, 6))
    single = flops(block.eval(), torch.randn(1, 4, 6, 6)).blocks[""]
    assert report.blocks["0"].dense == 2 * single.dense
    assert report.blocks["0"].experts == 2 * single.experts


def _executed_case(tokens: str, dispatcher: str = "sparse", **kwargs: object) -> tuple[convmoe.flops, nn.Module]:
    torch.manual_seed(0)
    block = MoEConv2d.from_conv(nn.Conv2d(16, 24, 3, padding=1), num_experts=4, top_k=2, tokens=tokens,
                                dispatcher=dispatcher, **kwargs)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), block).eval()
    return flops(model, torch.randn(2, 3, 6, 6)), block


def test_merged_image_experts_execute_one_conv_per_image_plus_the_mixing() -> None:
    report, block = _executed_case("image", "sparse:merged")
    counted = report.blocks["1"]
    used = int((block.last_routing.dense_weights()[:, 0] != 0).any(dim=0).sum())
    mixing = 2 * used * (24 * 16 * 9 + 24)  # each image's weighted sum of the used experts' weights and biases
    assert counted.active == counted.gate + 2 * counted.dense  # the definition: two experts per token
    # fvcore prices the einsum from numpy's einsum_path estimate, which can be one multiply-add off
    assert counted.executed == pytest.approx(counted.gate + counted.dense + mixing, abs=2)
    assert report.executed == report.active - counted.active + counted.executed


def test_one_image_with_one_expert_executes_that_experts_conv_only() -> None:
    torch.manual_seed(0)
    block = MoEConv2d.from_conv(nn.Conv2d(16, 24, 3, padding=1), num_experts=4, top_k=1, tokens="image")
    report = flops(nn.Sequential(nn.Conv2d(3, 16, 1), block).eval(), torch.randn(1, 3, 6, 6))
    counted = report.blocks["1"]
    assert counted.active == counted.gate + counted.dense
    assert counted.executed == counted.active  # no weights mixed: the expert's own conv


def test_deltas_path_executes_every_factor_on_every_position() -> None:
    report, _ = _executed_case("pixel", experts="lowrank", expert_kwargs={"rank": 2})
    counted, positions, rank_channels = report.blocks["1"], 2 * 6 * 6, 4 * 2
    kernel = positions * ((24 + rank_channels) * 16 * 9 + 24 * rank_channels)  # [W0; down] conv, then up
    assert counted.executed == counted.gate + kernel
    assert counted.executed > counted.active  # all E deltas, not the k routed ones


@pytest.mark.parametrize(("tokens", "dispatcher", "expected"), [
    ("pixel", "sparse:gathered", "active"), ("grid:2x2", "sparse:regions", "active"), ("grid:2x2", "dense", "all"),
])
def test_routed_paths_execute_the_active_count_and_the_reference_every_expert(tokens: str, dispatcher: str,
                                                                              expected: str) -> None:
    counted = _executed_case(tokens, dispatcher)[0].blocks["1"]
    assert counted.executed == (counted.active if expected == "active" else counted.gate + counted.all_experts)
