"""UPerNetMoE / UPerNetMEDoE (smp-based) and the classification helpers."""

from __future__ import annotations

import inspect
import json

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

import convmoe
from convmoe import MoEConv2d
from convmoe.models import (
    UPerNetMEDoE,
    UPerNetMoE,
    create_classifier,
    load_encoder_weights,
    resolve_moe_config,
    upernet_moe_config,
)
from convmoe.routers import ExpertChoiceRouter, TokenChoiceRouter

TINY = {"encoder_name": "tu-test_resnet", "encoder_weights": None, "decoder_channels": 16, "classes": 5}
SPEC_DEFAULTS = {"decoder_channels": 256, "moe_num_experts": 8, "moe_top_k": 2, "moe_noise_std": 1.0,
                 "moe_capacity_factor": 1.25, "moe_use_shared_expert": False, "moe_routing": "token_choice",
                 "moe_aux_loss_weight": 0.01, "moe_at_fusion": True, "moe_at_fpn": False}


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64)


def moe_blocks(model: nn.Module) -> dict[str, MoEConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEConv2d)}


@pytest.mark.parametrize("cls", [UPerNetMoE, UPerNetMEDoE])
def test_constructor_keywords_and_defaults(cls):
    parameters = inspect.signature(cls.__init__).parameters
    for name in ("encoder_name", "encoder_weights", "in_channels", "classes"):
        assert name in parameters
    assert {name: parameters[name].default for name in SPEC_DEFAULTS} == SPEC_DEFAULTS
    if cls is UPerNetMEDoE:
        assert parameters["medoe_drop_rate"].default == 0.1


def test_default_model_has_a_token_choice_moe_fusion_block():
    model = UPerNetMoE(**TINY)
    blocks = moe_blocks(model)
    assert list(blocks) == ["decoder.fusion_block.0"]
    block = blocks["decoder.fusion_block.0"]
    assert isinstance(block.router, TokenChoiceRouter)
    config = block.config
    assert (config.num_experts, config.top_k, config.noise_std, config.capacity_factor) == (8, 2, 1.0, None)
    assert config.losses == {"switch": 0.01}
    assert not config.shared_expert
    assert isinstance(model.decoder.fusion_block[1], nn.BatchNorm2d)  # the norm and ReLU stay
    assert all(isinstance(b[0], nn.Conv2d) for b in model.decoder.fpn_conv_blocks)
    assert isinstance(model, smp.UPerNet)


def test_fpn_blocks_and_shared_expert():
    model = UPerNetMoE(**TINY, moe_at_fusion=False, moe_at_fpn=True, moe_use_shared_expert=True, moe_num_experts=4)
    blocks = moe_blocks(model)
    assert sorted(blocks) == [f"decoder.fpn_conv_blocks.{i}.0" for i in range(3)]
    assert all(b.shared_expert is not None and b.config.num_experts == 4 for b in blocks.values())
    assert isinstance(model.decoder.fusion_block[0], nn.Conv2d)


def test_expert_choice_uses_the_capacity_factor_and_no_aux_loss(x):
    model = UPerNetMoE(**TINY, moe_routing="expert_choice", moe_capacity_factor=1.5, moe_aux_loss_weight=0.0)
    block = moe_blocks(model)["decoder.fusion_block.0"]
    assert isinstance(block.router, ExpertChoiceRouter)
    assert block.config.capacity_factor == 1.5
    assert block.config.losses == {}
    model(x)
    assert float(convmoe.aux_loss(model)) == 0.0
    assert convmoe.routing_stats(model)["decoder.fusion_block.0"].capacity_ratio is not None


def test_expert_choice_with_an_aux_weight_warns():
    with pytest.warns(UserWarning, match="set moe_aux_loss_weight=0"):
        UPerNetMoE(**TINY, moe_routing="expert_choice")


def test_unknown_routing_is_an_error():
    with pytest.raises(ValueError, match="moe_routing='top_k'"):
        UPerNetMoE(**TINY, moe_routing="top_k")


def test_moe_overrides_reach_the_blocks():
    model = UPerNetMoE(**TINY, moe_overrides={"tokens": "grid:3x3", "capacity_factor": 1.0})
    config = moe_blocks(model)["decoder.fusion_block.0"].config
    assert config.tokens == "grid:3x3"
    assert config.capacity_factor == 1.0


def test_forward_backward_and_aux_loss(x):
    model = UPerNetMoE(**TINY, moe_at_fpn=True, moe_num_experts=4).train()
    y = model(x)
    assert y.shape == (2, 5, 64, 64)
    aux = convmoe.aux_loss(model)
    switch_terms = [b.last_aux.terms["switch"] for b in moe_blocks(model).values()]
    torch.testing.assert_close(aux, 0.01 * torch.stack(switch_terms).sum())
    (y.square().mean() + aux).backward()
    for block in moe_blocks(model).values():
        assert block.experts.weight.grad is not None
        assert block.experts.weight.grad.abs().sum() > 0
        assert block.router.gate.proj.weight.grad.abs().sum() > 0
    assert len(convmoe.routing_stats(model).blocks) == 4


def test_experts_start_different_from_each_other():
    weight = moe_blocks(UPerNetMoE(**TINY))["decoder.fusion_block.0"].experts.weight
    assert not torch.allclose(weight[0], weight[1])


def test_medoe_drops_experts_in_training_only(x):
    model = UPerNetMEDoE(**TINY, moe_num_experts=8, medoe_drop_rate=0.25)
    block = moe_blocks(model)["decoder.fusion_block.0"]
    model.train()(x)
    assert int(block.last_routing.expert_mask.sum()) == 6
    summary = convmoe.routing_stats(model).summary()
    assert 0 < summary["medoe_expert_utilization"] <= 1
    assert "medoe_expert_entropy" in summary
    model.eval()(x)
    assert block.last_routing.expert_mask is None


def test_medoe_drop_rate_is_validated():
    with pytest.raises(ValueError, match=r"medoe_drop_rate=1\.0"):
        UPerNetMEDoE(**TINY, medoe_drop_rate=1.0)


@pytest.mark.parametrize("cls", [UPerNetMoE, UPerNetMEDoE])
def test_hub_round_trip_keeps_config_and_outputs(cls, x, tmp_path):
    model = cls(**TINY, moe_num_experts=4, moe_at_fpn=True).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_model_class"] == cls.__name__
    assert saved["moe_num_experts"] == 4
    assert saved["moe_at_fpn"] is True
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls
    torch.testing.assert_close(loaded(x), model(x))
    assert callable(loaded.push_to_hub)


@pytest.mark.parametrize("cls", [UPerNetMoE, UPerNetMEDoE])
def test_a_moe_config_instead_of_the_seed_keywords(cls, x, tmp_path):
    config = convmoe.MoEConfig(num_experts=3, top_k=1, tokens="grid:2x2", losses={"z": 0.001})
    model = cls(**TINY, moe_config=config, moe_overrides={"noise_std": 0.5}).eval()
    block = model.decoder.fusion_block[0]
    expected = config.replace(noise_std=0.5)
    if cls is UPerNetMEDoE:  # its expert dropout goes on top of the given config
        expected = expected.replace(dropout="medoe", drop_rate=0.1)
    assert block.config == expected
    assert config.noise_std != 0.5  # the caller's config is not changed
    # smp's Hub methods save it as JSON and rebuild the same model.
    model.save_pretrained(tmp_path / "smp")
    assert json.loads((tmp_path / "smp" / "config.json").read_text())["moe_config"] == expected.to_dict()
    loaded = cls.from_pretrained(tmp_path / "smp")
    assert loaded.decoder.fusion_block[0].config == expected
    torch.testing.assert_close(loaded(x), model(x))
    # convmoe's save_pretrained records the dict form and reloads exactly.
    recorded = convmoe.create_model(f"convmoe.models.upernet:{cls.__name__}", **TINY, moe_config=config.to_dict())
    folder = convmoe.save_pretrained(recorded.eval(), tmp_path / "convmoe")
    torch.testing.assert_close(convmoe.from_pretrained(folder)(x), recorded(x), rtol=0, atol=0)


def test_a_moe_config_and_changed_seed_keywords_is_an_error():
    with pytest.raises(ValueError, match=r"got moe_config and moe_num_experts, moe_top_k; pass the MoE settings one way"):
        UPerNetMoE(**TINY, moe_config="upernet_fusion_moe", moe_num_experts=4, moe_top_k=1)
    assert UPerNetMoE(**TINY, moe_config="upernet_fusion_moe_expert_choice", moe_aux_loss_weight=0.01
                      ).decoder.fusion_block[0].config.router == "expert_choice"


def test_load_encoder_weights_from_a_timm_backbone():
    backbone = timm.create_model("test_resnet")
    model = UPerNetMoE(**TINY)
    unused = load_encoder_weights(model, backbone)
    assert "fc.weight" in unused
    encoder_state = model.encoder.model.state_dict()
    for key, value in encoder_state.items():
        torch.testing.assert_close(value, backbone.state_dict()[key])
    with pytest.raises(ValueError, match="not the encoder's backbone"):
        load_encoder_weights(model, timm.create_model("test_efficientnet"))


def test_upernet_moe_config_validates_through_moe_config():
    with pytest.raises(ValueError, match="top_k"):
        upernet_moe_config(num_experts=2, top_k=3)


def test_resolve_moe_config_forms():
    assert resolve_moe_config({"preset": "upernet_fusion_moe", "num_experts": 4}).noise_std == 1.0
    assert resolve_moe_config({"num_experts": 4}).num_experts == 4
    with pytest.raises(ValueError, match="unknown MoEConfig keys"):
        resolve_moe_config({"experts_count": 4})


def test_create_classifier_dense():
    model = create_classifier("test_resnet", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not moe_blocks(model)


def test_create_classifier_patched_keeps_outputs():
    if not hasattr(convmoe, "patch"):
        pytest.skip("convmoe.patch is not available yet")
    torch.manual_seed(0)
    dense = create_classifier("test_resnet", num_classes=10).eval()
    torch.manual_seed(0)
    patched = create_classifier("test_resnet", num_classes=10, moe_targets="last_stage",
                                moe_config={"num_experts": 4, "top_k": 2}).eval()
    assert moe_blocks(patched)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(patched(x), dense(x), atol=1e-4, rtol=0)
