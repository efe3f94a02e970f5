"""Every bad input to patch / apply_spec / unpatch / placements gives an error that names the problem and the fix."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import convmoe
from convmoe import MoEConfig, MoEConv2d
from convmoe.patch import apply_spec, patch_spec, patched_blocks

CONFIG = MoEConfig(num_experts=2, top_k=1)


def resnet_like() -> nn.Module:
    def block() -> nn.Sequential:
        return nn.Sequential()

    model = nn.Module()
    model.conv1 = nn.Conv2d(3, 8, 3, padding=1)
    model.bn1 = nn.BatchNorm2d(8)
    for stage in (3, 4):
        layer = nn.Sequential()
        for index in range(2):
            unit = block()
            unit.add_module("conv1", nn.Conv2d(8, 8, 3, padding=1))
            unit.add_module("conv2", nn.Conv2d(8, 8, 3, padding=1))
            layer.add_module(str(index), unit)
        model.add_module(f"layer{stage}", layer)
    return model


def test_no_match_lists_the_closest_names() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "patch(): targets 'layer5.*' matched no module; closest names: 'layer4.0.conv1', 'layer4.0.conv2', "
            "'layer4.1.conv1', 'layer4.1.conv2', 'layer3.0.conv1' and 3 more.")):
        convmoe.patch(resnet_like(), targets="layer5.*")


@pytest.mark.parametrize(("targets", "message"), [
    (r"re:layer9\..*", r"targets 're:layer9\..*' matched no module; closest names: 'layer4.1.conv2'"),
    (["conv1", "layer3.0.conv3"], ("targets 'layer3.0.conv3' matched no module; closest names: 'layer3.0.conv2', "
                                  "'layer3.0.conv1'.")),
    (nn.Conv3d, "targets Conv3d matched no module"),
    (lambda name, module: False, "targets <lambda> matched no module"),
])
def test_every_spec_in_a_list_must_match(targets: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        convmoe.patch(resnet_like(), targets=targets)


def test_matching_only_non_convs_says_so() -> None:
    with pytest.raises(ValueError, match=re.escape("targets 'bn1' matched 1 module(s) but no convolution: 'bn1' "
                                                   "(BatchNorm2d).")):
        convmoe.patch(resnet_like(), targets="bn1")


def test_a_container_is_not_silently_expanded() -> None:
    with pytest.raises(ValueError, match=re.escape("'layer3.0' (Sequential holding 2 convs, e.g. 'layer3.0.conv1'; "
                                                   "use 'layer3.0.*' or name them)")):
        convmoe.patch(resnet_like(), targets="layer3.0")


@pytest.mark.parametrize(("targets", "message"), [
    (3, ("targets must be a name, glob, 're:' regex, placement, module class, predicate (name, module) -> bool, or "
        "a list of these; got 3 (int).")),
    ([], "targets is an empty list"),
    (int, "targets class int is not an nn.Module subclass."),
])
def test_bad_target_types(targets: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        convmoe.patch(resnet_like(), targets=targets)


def test_invalid_regex() -> None:
    with pytest.raises(ValueError, match=re.escape("targets 're:((' is not a valid regular expression")):
        convmoe.patch(resnet_like(), targets="re:((")


def test_exclude_errors() -> None:
    with pytest.raises(ValueError, match=re.escape("exclude 'layer9' matched no module")):
        convmoe.patch(resnet_like(), targets="layer4.*", exclude="layer9")
    with pytest.raises(ValueError, match=re.escape("exclude 'layer4' removes every conv that targets 'layer4.*' "
                                                   "selected")):
        convmoe.patch(resnet_like(), targets="layer4.*", exclude="layer4")


class Shifted(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


def _hooked() -> nn.Conv2d:
    conv = nn.Conv2d(8, 8, 1)
    conv.register_forward_pre_hook(lambda module, args: None)
    return conv


@pytest.mark.parametrize(("module", "reason"), [
    (nn.ConvTranspose2d(8, 8, 2), "ConvTranspose2d: ConvTranspose2d is a transposed convolution"),
    (nn.Conv1d(8, 8, 3), "Conv1d: Conv1d is not an nn.Conv2d"),
    (Shifted(8, 8, 3), ("Shifted: Shifted overrides nn.Conv2d's forward and no converter knows what it computes; "
                       "register one with convmoe.patch.register_converter")),
    (nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3)), "ParametrizedConv2d: its weight is parametrised"),
    (nn.LazyConv2d(8, 3), "LazyConv2d: a lazy conv whose weight is not created yet; run one forward pass"),
    (_hooked(), "Conv2d: it has forward hooks the MoE block would not run"),
])
def test_targets_matching_only_unconvertible_convs(module: nn.Module, reason: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), module)
    with pytest.raises(ValueError, match=re.escape(f"patch(): targets '1' matched only convolutions convmoe cannot "
                                                   f"convert: '1' ({reason}")):
        convmoe.patch(model, targets="1")
    assert not patched_blocks(model)


def test_timm_exotic_convs_are_refused_by_name() -> None:
    timm = pytest.importorskip("timm")
    model = nn.Sequential(timm.layers.MixedConv2d(8, 8, [3, 5], depthwise=True),
                          timm.layers.CondConv2d(8, 8, 3, num_experts=2))
    with pytest.raises(ValueError, match=re.escape("'0' (MixedConv2d: splits its channels across several kernel "
                                                   "sizes; target its per-kernel convs (children '0', '1') instead)")):
        convmoe.patch(model, targets="0")
    with pytest.raises(ValueError, match=re.escape("'1' (CondConv2d: mixes per-sample expert kernels")):
        convmoe.patch(model, targets="1")


def test_repatching_a_block_is_refused() -> None:
    model = convmoe.patch(resnet_like(), targets="conv1", config=CONFIG)
    with pytest.raises(ValueError, match=re.escape("'conv1' (MoEConv2d: already an MoE block; convmoe.unpatch it "
                                                   "first to patch it again)")):
        convmoe.patch(model, targets="conv1")


def test_a_shared_conv_is_refused() -> None:
    shared = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match=re.escape("the same module is registered under several names ('1', '3')")):
        convmoe.patch(model, targets="1")


def test_mixed_selection_patches_what_it_can_and_warns_about_the_rest() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 2), nn.Conv2d(8, 8, 3))
    with pytest.warns(UserWarning, match=re.escape("patch(): skipping 1 selected conv(s) that cannot be converted: "
                                                   "'1' (ConvTranspose2d")):
        convmoe.patch(model, targets="*", config=CONFIG)
    assert list(patched_blocks(model)) == ["0", "2"]


def test_a_config_that_does_not_fit_names_the_conv_and_leaves_the_model_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match=re.escape("patch(): cannot build the MoE block for '1' (Conv2d 8->8 3x3 "
                                                   "stride (2, 2)): ")) as error:
        convmoe.patch(model, targets="*", config=MoEConfig(num_experts=2, top_k=1, experts="residual"), upcycle=False)
    assert "residual experts keep the spatial size" in str(error.value)
    assert not patched_blocks(model), "the first conv must not be swapped when the second fails"


@pytest.mark.parametrize(("config", "error", "message"), [
    (3.0, TypeError, "the config for 'conv1' must be an MoEConfig, a dict of its fields or a preset name, got float"),
    ({"experts_count": 4}, ValueError, "unknown MoEConfig keys ['experts_count']"),
    ("upernet", ValueError, "unknown preset 'upernet'"),
    (lambda name, conv: 7, TypeError, "the config for 'conv1' must be an MoEConfig"),
])
def test_bad_configs(config: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        convmoe.patch(resnet_like(), targets="conv1", config=config)


def test_the_model_itself_cannot_be_replaced_in_place() -> None:
    with pytest.raises(ValueError, match=re.escape("the model itself is the convolution; wrap it, e.g. "
                                                   "nn.Sequential(conv)")):
        convmoe.patch(nn.Conv2d(3, 4, 3), targets=nn.Conv2d)


@pytest.mark.parametrize(("targets", "message"), [
    ("decoder_last", "placement 'decoder_last' needs a segmentation model with a `decoder` submodule"),
    ("fusion", "placement 'fusion' needs a segmentation model with a `decoder` submodule"),
    ("last_stage", "placement 'last_stage': cannot find the stages of Sequential"),
])
def test_placements_undefined_for_the_model(targets: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        convmoe.patch(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), targets=targets)


def test_last_without_a_spatial_conv() -> None:
    with pytest.raises(ValueError, match=re.escape("placement 'last': Sequential has no k x k conv (k > 1) outside "
                                                   "its head")):
        convmoe.patch(nn.Sequential(nn.Conv2d(3, 4, 1)), targets="last")


def test_apply_spec_errors() -> None:
    spec = patch_spec(convmoe.patch(resnet_like(), targets="layer4.0.conv1", config=CONFIG))
    with pytest.raises(ValueError, match=re.escape("expected a patch spec {'version': 1, 'modules': {...}} as written "
                                                   "by convmoe.patch_spec, got version 2")):
        apply_spec(resnet_like(), {**spec, "version": 2})
    model = resnet_like()
    del model.layer4
    with pytest.raises(ValueError, match=re.escape("the model has no module 'layer4.0.conv1'; closest names: "
                                                   "'layer3.0.conv1'")):
        apply_spec(model, spec)
    wrong = {"version": 1, "modules": {"layer4.0.conv1": {**spec["modules"]["layer4.0.conv1"],
                                                          "converter": "timm_conv2d_same"}}}
    with pytest.raises(ValueError, match=re.escape("converter 'timm_conv2d_same' does not apply to 'layer4.0.conv1' "
                                                   "(Conv2d)")):
        apply_spec(resnet_like(), wrong)
    model = resnet_like()
    with pytest.raises(ValueError, match=re.escape("converter 'conv2d' does not apply to 'conv1' (MoEConv2d: already "
                                                   "an MoE block")):
        apply_spec(convmoe.patch(model, targets="conv1", config=CONFIG),
                   {"version": 1, "modules": {"conv1": {"config": CONFIG.to_dict(), "converter": "conv2d"}}})


def test_unpatch_errors() -> None:
    with pytest.raises(ValueError, match=re.escape("unpatch(): the model has no MoEConv2d block to fold.")):
        convmoe.unpatch(resnet_like())
    with pytest.raises(ValueError, match=re.escape("unpatch(): how='median' is not one of average, usage, base.")):
        convmoe.unpatch(convmoe.patch(resnet_like(), targets="conv1", config=CONFIG), how="median")
    model = convmoe.patch(resnet_like(), targets="conv1", config=CONFIG)
    with pytest.raises(ValueError, match=re.escape("block 'conv1' has no routing yet; pass inputs= (a batch to "
                                                   "measure on) or run a forward pass first.")):
        convmoe.unpatch(model, how="usage")
    model = convmoe.patch(resnet_like(), targets="conv1", config=MoEConfig(num_experts=2, top_k=1, expert_act="relu"))
    with pytest.raises(TypeError, match=re.escape("'conv1' has an expert norm/activation (expert_norm=None, "
                                                  "expert_act='relu')")):
        convmoe.unpatch(model)
    residual = nn.Sequential(MoEConv2d(8, 8, 3, padding=1, num_experts=2, top_k=1, experts="residual"),
                             MoEConv2d(8, 8, 3, padding=1, num_experts=2, top_k=1))
    with pytest.raises(TypeError, match=re.escape("'0' has ResidualConvExperts experts; only conv and low-rank "
                                                  "experts (experts='conv' or 'lowrank') fold into one conv.")):
        convmoe.unpatch(residual)
    assert isinstance(residual[1], MoEConv2d), "a refused unpatch changes nothing"
