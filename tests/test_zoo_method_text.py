"""A card's words about the model come from the model and its recipe: the experts, balancing and frozen parts."""

from __future__ import annotations

from torch import nn

from convmoe import MoEConv2d
from convmoe.zoo.method_text import describe_initialization, describe_moe, method_references


def test_low_rank_experts_and_bias_balancing_are_named_with_their_reference():
    model = nn.Sequential(MoEConv2d(8, 8, 1, num_experts=4, top_k=2, tokens="image", experts="lowrank",
                                    expert_kwargs={"rank": 2}, losses={}, bias_balancing=0.001))
    text, names = describe_moe(model)
    assert text == ("`0`: 4 low-rank (rank 2) experts, top-2, image tokens, token_choice routing, "
                    "loss-free bias balancing (rate 0.001)")
    assert names == ["0"]
    assert any("arXiv:2408.15664" in reference for reference in method_references(model, {"model": {}}))
    assert not any("Switch" in reference for reference in method_references(model, {"model": {}}))


def test_full_rank_experts_keep_the_short_wording():
    assert describe_moe(nn.Sequential(MoEConv2d(4, 4, 3, num_experts=4, top_k=1)))[0] == (
        "`0`: 4 experts, top-1, pixel tokens, token_choice routing")


def test_frozen_modules_and_freeze_base_are_stated():
    config = {"model": {}, "freeze": {"modules": ["conv_stem", "blocks.0"], "freeze_norm_stats": False},
              "freeze_base": {"train": ["fc"]}}
    assert describe_initialization(config) == (
        "random (trained from scratch); `conv_stem`, `blocks.0` frozen; all but the MoE experts, routers, `fc` frozen")


def test_a_patch_section_that_upcycles_is_stated_after_the_encoder_weights():
    config = {"model": {"_target_": "segmentation_models_pytorch.UPerNet"}, "init_encoder_from": {"_target_": "a.load"},
              "patch": {"targets": "last_stage_pointwise", "config": {"num_experts": 4}}}
    assert describe_initialization(config) == ("encoder weights from `a.load`; the patched convs' experts start as "
                                               "copies of those convs (upcycling)")
    fresh = {**config, "patch": {**config["patch"], "upcycle": False}}
    assert describe_initialization(fresh) == "encoder weights from `a.load`; the patched convs' experts start random"
