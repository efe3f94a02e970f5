"""MoEConfig: validation, dict/JSON round trips, presets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from convmoe import MoEConfig, MoEConv2d, get_preset, list_presets
from convmoe.dispatch.sparse import PATHS
from convmoe.presets import PRESETS
from convmoe.routers import ExpertChoiceRouter

CONFIGS = [
    MoEConfig(),
    MoEConfig(num_experts=4, top_k=1, tokens="grid:2x4", router="expert_choice", gate="conv_gap",
              dispatcher="sparse:regions", capacity_factor=1.5, noise_std=0.5, temperature=0.7, losses={}),
    MoEConfig(tokens="patch:8", router="positional", experts="residual", dropout="medoe", drop_rate=0.25,
              losses={"switch": 0.01, "z": 0.001, "diversity": 0.01, "importance": 0.1},
              router_kwargs={"gate_kwargs": {"num_frequencies": 2}}, expert_kwargs={"norm_groups": 4}),
    MoEConfig(tokens="image", dispatcher="dense", expert_norm="layer", expert_act="silu", shared_expert=True,
              upcycle_noise_std=0.01),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_round_trip_through_dict_and_json(config: MoEConfig) -> None:
    data = config.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(MoEConfig)}
    assert MoEConfig.from_dict(data) == config
    text = config.to_json()
    assert json.loads(text) == data
    assert MoEConfig.from_json(text) == config
    assert MoEConfig.from_dict(json.loads(json.dumps(data))) == config


def test_class_valued_parts_are_written_by_name() -> None:
    config = MoEConfig(router=ExpertChoiceRouter)
    assert config.to_dict()["router"] == "expert_choice"
    assert MoEConfig.from_dict(config.to_dict()) == MoEConfig(router="expert_choice")


def test_unregistered_part_cannot_be_written() -> None:
    class MyRouter(ExpertChoiceRouter):
        pass

    with pytest.raises(TypeError, match=r"MoEConfig.router=.*MyRouter.* cannot be written to a config; register it "
                                        r"with convmoe.ROUTERS.register\('name'\) and use the name"):
        MoEConfig(router=MyRouter).to_dict()


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown MoEConfig keys \['expert_count', 'topk'\]; valid keys: \[.*'num_experts'"):
        MoEConfig.from_dict({"expert_count": 4, "topk": 1, "tokens": "pixel"})
    with pytest.raises(ValueError, match=r"unknown MoEConfig keys \['topk'\]"):
        MoEConfig.from_json('{"topk": 1}')


def test_replace_validates_again() -> None:
    config = MoEConfig(num_experts=4)
    assert config.replace(top_k=1).top_k == 1
    with pytest.raises(ValueError, match=r"top_k=8 must be in \[1, num_experts=4\]"):
        config.replace(top_k=8)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_experts": 0}, r"num_experts=0 must be a positive int"),
    ({"num_experts": 2.5}, r"num_experts=2.5 must be a positive int"),
    ({"top_k": 3, "num_experts": 2}, r"top_k=3 must be in \[1, num_experts=2\]; lower top_k or raise num_experts"),
    ({"top_k": 0}, r"top_k=0 must be in \[1, num_experts=8\]"),
    ({"noise_std": -0.1}, r"noise_std=-0.1 must be >= 0"),
    ({"temperature": 0}, r"temperature=0 must be > 0"),
    ({"capacity_factor": -1.0}, r"capacity_factor=-1.0 must be > 0, or None for no limit"),
    ({"router": "topk"}, r"unknown router 'topk'; available: expert_choice, positional, token_choice"),
    ({"router": "token_choise"}, r"unknown router 'token_choise'.*\(did you mean 'token_choice'\?\)"),
    ({"tokens": "pixle"}, r"unknown tokens 'pixle'; available: grid, image, patch, pixel \(did you mean 'pixel'\?\)"),
    ({"tokens": "grid:3x"}, r"cannot read tokens spec 'grid:3x'"),
    ({"dispatcher": "sparce"}, r"unknown dispatcher 'sparce'; available: dense, sparse \(did you mean 'sparse'\?\)"),
    ({"dispatcher": "sparse:regoins"}, (rf"unknown sparse dispatch path 'regoins'; available: {', '.join(PATHS)} "
                                       r"\(did you mean 'regions'\?\)")),
    ({"experts": "convs"}, r"unknown experts 'convs'; available: conv, lowrank, residual \(did you mean 'conv'\?\)"),
    ({"gate": "gap"}, r"unknown gate 'gap'; available: conv_gap, linear, positional"),
    ({"losses": {"balance": 0.01}}, r"unknown loss 'balance'; available: diversity, importance, switch, switch_global, z"),
])
def test_invalid_configs_raise_with_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dispatcher": {"name": "sparse", "path": "gathered"}},
     (r"MoEConfig.dispatcher=\{'name': 'sparse', 'path': 'gathered'\} is plain data \(dict\); give a registered "
     r"dispatcher name \(dense, sparse\), a class or an instance\.$")),
    ({"router": ["token_choice"]}, (r"MoEConfig.router=\['token_choice'\] is plain data \(list\); give a registered "
                                   r"router name \(expert_choice, positional, token_choice\)")),
    ({"experts": 8}, r"MoEConfig.experts=8 is plain data \(int\); give a registered experts name \(conv, lowrank"),
    ({"tokens": 3.0}, r"MoEConfig.tokens=3.0 is plain data \(float\)"),
    ({"dropout": True}, r"MoEConfig.dropout=True is plain data \(bool\); give a registered expert dropout name"),
])
def test_a_part_given_as_plain_data_is_refused_when_configured(kwargs: dict, match: str) -> None:
    # A dict dispatcher used to pass and fail at the first forward pass ("'dict' object is not callable").
    with pytest.raises(TypeError, match=match):
        MoEConfig(**kwargs)


def test_presets_cite_and_list() -> None:
    assert list_presets() == sorted(PRESETS)
    assert len(list_presets()) >= 5
    with pytest.raises(ValueError, match=r"unknown preset 'upernet'; available: .*upernet_fusion_moe"):
        get_preset("upernet")
    assert get_preset("patchwise_segmentation_moe", num_experts=4).num_experts == 4


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_a_block_that_runs_and_trains(name: str) -> None:
    config = get_preset(name, num_experts=4)
    assert MoEConfig.from_json(config.to_json()) == config
    # a stride-1 'same' conv suits every preset, residual experts included
    block = MoEConv2d(8, 8, 3, padding=1, config=config).train()
    x = torch.randn(2, 8, 16, 16)
    y = block(x)
    assert y.shape == (2, 8, 16, 16)
    assert torch.isfinite(y).all()
    (y.square().mean() + block.last_aux.total).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.router.parameters())
    block.eval()
    assert torch.equal(block(x), block(x))
