"""Named placements: "last", "last_stage", "last_stage_pointwise", "decoder_last", "fusion" on timm, smp and plain models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convmoe
from convmoe.patch import select_targets
from convmoe.patch.placements import (
    PLACEMENTS,
    decoder_last,
    fusion,
    head_names,
    last,
    last_stage,
    list_placements,
)

timm = pytest.importorskip("timm")
smp = pytest.importorskip("segmentation_models_pytorch")


def test_placements_are_listed() -> None:
    assert list_placements() == sorted(PLACEMENTS) == ["decoder_last", "fusion", "last", "last_stage",
                                                       "last_stage_pointwise"]


@pytest.mark.parametrize(("build", "expected"), [
    (lambda: timm.create_model("test_efficientnet"), ["blocks.4.0.conv_pw", "blocks.4.0.conv_pwl"]),  # not se.*
    (lambda: timm.create_model("test_resnet"), ["layer4.0.downsample.1"]),  # basic blocks: 3x3 convs only
    (lambda: __import__("torchvision").models.mobilenet_v3_small(), ["features.11.block.0.0", "features.11.block.3.0"]),
])
def test_last_stage_pointwise_is_the_deepest_stages_ungrouped_1x1_convs_outside_se_gates(build, expected) -> None:
    model = build()
    assert PLACEMENTS["last_stage_pointwise"](model) == expected
    # low-rank experts fit every one of them, and the patched model is the dense one until training
    x = torch.randn(1, 3, 64, 64)
    before = model.eval()(x)
    convmoe.patch(model, targets="last_stage_pointwise", config=convmoe.MoEConfig(experts="lowrank", num_experts=4))
    assert [name for name, _ in convmoe.moe_blocks(model)] == expected
    assert (model(x) - before).abs().max() <= 1e-5


def test_a_stage_without_pointwise_convs_names_the_fix() -> None:
    model = nn.Module()
    model.layer1, model.layer2 = nn.Sequential(nn.Conv2d(3, 8, 1)), nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ValueError, match=r"placement 'last_stage_pointwise': .* holds no ungrouped 1x1 conv; name the "):
        PLACEMENTS["last_stage_pointwise"](model)


def test_last_is_the_last_spatial_conv_before_the_head() -> None:
    model = timm.create_model("test_resnet")
    assert last(model) == ["layer4.0.conv2"]
    # EfficientNet ends with a 1x1 conv_head: the last k x k conv is the last depthwise conv.
    assert last(timm.create_model("efficientnet_lite0")) == ["blocks.6.0.conv_dw"]


def test_last_skips_a_segmentation_head_with_a_3x3_conv() -> None:
    model = smp.Unet("resnet18", encoder_weights=None, decoder_channels=(32, 16, 16, 8, 8))
    assert model.segmentation_head[0].kernel_size == (3, 3)
    assert head_names(model) == ["segmentation_head"]
    assert last(model) == ["decoder.blocks.4.conv2.0"]


def test_last_skips_transposed_convs() -> None:
    model = smp.Linknet("resnet18", encoder_weights=None)
    assert last(model) == ["encoder.layer4.1.conv2"]


def test_head_names_come_from_the_timm_classifier() -> None:
    assert head_names(timm.create_model("test_convnext")) == ["head"]
    assert head_names(timm.create_model("test_efficientnet")) == ["classifier"]
    assert head_names(nn.Sequential(nn.Conv2d(1, 1, 3))) == []


@pytest.mark.parametrize(("name", "first", "count"), [
    ("test_efficientnet", "blocks.4.0.conv_dw", 1),
    ("resnext26ts", "stages.3.0.conv2_kxk.conv", 2),  # feature_info ends at final_conv (1x1): stages.3 counts
    ("densenet121", "features.denseblock4.denselayer1.conv2", 16),  # ends at norm5: transition3 is 1x1
    ("hrnet_w18_small", "transition3.3.0.0", 27),  # 'stem'/'stage1' are not modules; stage3 -> stage4
    ("convnext_atto", "stages.3.downsample.1", 3),  # the 2x2 stride-2 downsampling conv is k x k too
])
def test_last_stage_follows_timm_feature_info(name: str, first: str, count: int) -> None:
    stage = last_stage(timm.create_model(name))
    assert (stage[0], len(stage)) == (first, count)


def test_last_stage_of_a_features_only_model_uses_its_flattened_names() -> None:
    stage = last_stage(timm.create_model("densenet121", features_only=True))
    assert stage[0] == "features_denseblock4.denselayer1.conv2"
    assert len(stage) == 16


@pytest.mark.parametrize(("encoder", "depth", "expected_prefix", "count"), [
    ("resnet18", 5, "encoder.layer4.", 4),
    ("resnet18", 4, "encoder.layer3.", 4),
    ("mobilenet_v2", 5, "encoder.features.", 4),  # get_stages() returns slices of features: names still resolve
    ("tu-test_resnet", 5, "encoder.model.layer4.", 2),
])
def test_last_stage_of_smp_encoders(encoder: str, depth: int, expected_prefix: str, count: int) -> None:
    channels = (32, 16, 16, 8, 8)[:depth]
    model = smp.Unet(encoder, encoder_weights=None, encoder_depth=depth, decoder_channels=channels)
    stage = last_stage(model)
    assert len(stage) == count
    assert all(name.startswith(expected_prefix) for name in stage)


class Stages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)) for _ in range(3)])
        self.stages.append(nn.Sequential(nn.Conv2d(8, 8, 1)))  # a 1x1-only tail is not the last stage
        self.head = nn.Linear(8, 2)


class Numbered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
        self.fc = nn.Linear(8, 2)


def test_last_stage_of_plain_models() -> None:
    assert last_stage(Stages()) == ["stages.2.0"]
    assert last_stage(Numbered()) == ["layer2.0", "layer2.1"]


@pytest.mark.parametrize(("arch", "kwargs", "expected"), [
    ("upernet", {"decoder_channels": 32}, ["decoder.fusion_block.0"]),
    ("pspnet", {"psp_out_channels": 32}, ["decoder.conv.0"]),
    ("deeplabv3", {"decoder_channels": 32}, ["decoder.aspp.project.0"]),
    ("deeplabv3plus", {"decoder_channels": 32}, ["decoder.block2.0.0", "decoder.block2.0.1"]),
    ("segformer", {"decoder_segmentation_channels": 32}, ["decoder.fuse_stage.0"]),
])
def test_fusion_blocks(arch: str, kwargs: dict, expected: list[str]) -> None:
    model = smp.create_model(arch, encoder_name="tu-test_resnet", encoder_weights=None, **kwargs)
    assert fusion(model) == expected


def test_dpt_fusion_is_its_last_fusion_block() -> None:
    model = smp.DPT("tu-test_vit", encoder_weights=None, decoder_intermediate_channels=(32, 32, 64, 64),
                    decoder_fusion_channels=32)
    names = fusion(model)
    assert len(names) == 5
    assert all(name.startswith("decoder.fusion_blocks.3.") for name in names)


@pytest.mark.parametrize(("arch", "kwargs", "expected"), [
    ("unet", {"decoder_channels": (32, 16, 16, 8, 8)}, "decoder.blocks.4.conv2.0"),
    ("fpn", {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}, "decoder.seg_blocks.3.block.0.block.0"),
    ("linknet", {}, "decoder.blocks.4.block.2.0"),
    ("deeplabv3", {"decoder_channels": 32}, "decoder.conv"),
])
def test_decoder_last(arch: str, kwargs: dict, expected: str) -> None:
    model = smp.create_model(arch, encoder_name="tu-test_resnet", encoder_weights=None, **kwargs)
    assert decoder_last(model) == [expected]


def test_placements_combine_with_other_specs_and_exclude() -> None:
    model = smp.UPerNet("tu-test_resnet", encoder_weights=None, decoder_channels=32)
    selection = select_targets(model, ["fusion", "decoder.fpn_conv_blocks.*"], exclude="decoder.fpn_conv_blocks.0")
    assert selection.names == ["decoder.fpn_conv_blocks.1.0", "decoder.fpn_conv_blocks.2.0", "decoder.fusion_block.0"]
    convmoe.patch(model, targets="fusion", config=convmoe.MoEConfig(num_experts=2, top_k=1))
    assert model.decoder.fusion_block[0].name == "decoder.fusion_block.0"
