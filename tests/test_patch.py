"""convmoe.patch: target specs, configs, in-place replacement, upcycling, and the patch spec round trip."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn

import convmoe
from convmoe import MoEConfig, MoEConv2d
from convmoe.patch import apply_spec, patch_spec, patched_blocks, register_converter, select_targets

CONFIG = MoEConfig(num_experts=4, top_k=2)


class Toy(nn.Module):
    """Every conv kind in one small net: plain, depthwise, pointwise, grouped + strided, dilated + reflect."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 16, 1))
        self.layer2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4), nn.ReLU(),
                                    nn.Conv2d(16, 16, 3, padding=2, dilation=2, padding_mode="reflect"))
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


def toy() -> Toy:
    torch.manual_seed(0)
    model = Toy().eval()
    with torch.no_grad():
        model.layer1[1].running_mean.uniform_(-0.5, 0.5)
        model.layer1[1].running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))


ALL_CONVS = ["stem", "layer1.0", "layer1.3", "layer2.0", "layer2.2", "head"]


@pytest.mark.parametrize(("targets", "expected"), [
    ("stem", ["stem"]),
    (["head", "stem"], ["stem", "head"]),
    ("layer*.0", ["layer1.0", "layer2.0"]),
    ("layer1.*", ["layer1.0", "layer1.3"]),
    ("*", ALL_CONVS),
    ("re:layer\\d\\.[02]", ["layer1.0", "layer2.0", "layer2.2"]),
    ("re:layer", []),  # a regex must match the whole name
    (nn.Conv2d, ALL_CONVS),
    (lambda name, module: isinstance(module, nn.Conv2d) and module.groups > 1, ["layer1.0", "layer2.0"]),
    ("last", ["layer2.2"]),
    ("last_stage", ["layer2.0", "layer2.2"]),
    (["stem", ["re:head"], ("layer2.2",)], ["stem", "layer2.2", "head"]),
])
def test_target_kinds_select_the_expected_convs(targets: object, expected: list[str]) -> None:
    model = toy()
    if not expected:
        with pytest.raises(ValueError, match="matched no module"):
            select_targets(model, targets)
        return
    assert select_targets(model, targets).names == expected


@pytest.mark.parametrize(("exclude", "expected"), [
    ("head", ["stem", "layer1.0", "layer1.3", "layer2.0", "layer2.2"]),
    ("layer2", ["stem", "layer1.0", "layer1.3", "head"]),  # a container keeps everything inside it dense
    (["re:layer1\\..*", "stem"], ["layer2.0", "layer2.2", "head"]),
    (lambda name, module: isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1),
     ["stem", "layer1.0", "layer2.0", "layer2.2"]),
])
def test_exclude_removes_convs_and_whole_subtrees(exclude: object, expected: list[str]) -> None:
    selection = select_targets(toy(), nn.Conv2d, exclude=exclude)
    assert selection.names == expected
    assert sorted(selection.excluded) == sorted(set(ALL_CONVS) - set(expected))


def test_patch_replaces_in_place_and_returns_the_model(x: torch.Tensor) -> None:
    model = toy()
    dense = copy.deepcopy(model)
    returned = convmoe.patch(model, targets=nn.Conv2d, config=CONFIG)
    assert returned is model
    blocks = patched_blocks(model)
    assert list(blocks) == ALL_CONVS
    for name, block in blocks.items():
        original = dense.get_submodule(name)
        assert model.get_submodule(name) is block
        assert block.name == name
        assert block.config == CONFIG
        assert block.converter == "conv2d"
        assert (block.in_channels, block.out_channels, block.groups) == (
            original.in_channels, original.out_channels, original.groups)
        assert block.geometry.kernel_size == original.kernel_size
        assert block.geometry.stride == original.stride
        assert block.geometry.dilation == original.dilation
        assert block.geometry.padding_mode == original.padding_mode
        assert not block.training
    assert isinstance(model.layer1[1], nn.BatchNorm2d), "non-conv modules are untouched"


@pytest.mark.parametrize("config", [
    MoEConfig(num_experts=4, top_k=2),
    MoEConfig(num_experts=3, top_k=1, tokens="grid:2x2"),
    MoEConfig(num_experts=2, top_k=1, tokens="image", shared_expert=True),
    MoEConfig(num_experts=4, top_k=4, tokens="patch:2", dispatcher="dense"),
], ids=["pixel-top2", "grid-top1", "image-shared", "patch-dense"])
def test_upcycled_model_computes_what_the_dense_model_computed(config: MoEConfig, x: torch.Tensor) -> None:
    model = toy()
    expected = model(x)
    convmoe.patch(model, targets="*", config=config)
    assert len(patched_blocks(model)) == len(ALL_CONVS)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_patch_keeps_dtype_device_and_training_mode() -> None:
    model = toy().double()
    model.layer2.train()
    convmoe.patch(model, targets="layer*.0", config=CONFIG)
    assert model.layer1[0].experts.weight.dtype == torch.float64
    assert model.layer1[0].router.gate.proj.weight.dtype == torch.float64
    assert not model.layer1[0].training
    assert model.layer2[0].training
    assert model(torch.randn(1, 3, 9, 9, dtype=torch.float64)).dtype == torch.float64


def test_upcycle_false_starts_from_fresh_experts(x: torch.Tensor) -> None:
    model = toy()
    expected = model(x)
    stem_weight = model.stem.weight.detach().clone()
    convmoe.patch(model, targets="stem", config=CONFIG, upcycle=False)
    assert not torch.equal(model.stem.experts.weight[0], stem_weight)
    assert not torch.allclose(model(x), expected, atol=1e-3)


def test_config_as_dict_preset_and_callable() -> None:
    model = convmoe.patch(toy(), targets="stem", config={"num_experts": 3, "top_k": 1})
    assert model.stem.config == MoEConfig(num_experts=3, top_k=1)
    model = convmoe.patch(toy(), targets="stem", config="shared_expert_moe")
    assert model.stem.config == convmoe.get_preset("shared_expert_moe")

    def per_conv(name: str, conv: nn.Conv2d) -> MoEConfig | dict | None:
        if name == "head":
            return None  # stays dense
        return {"num_experts": 2 if conv.groups > 1 else 4, "top_k": 1}

    model = convmoe.patch(toy(), targets=nn.Conv2d, config=per_conv)
    blocks = patched_blocks(model)
    assert "head" not in blocks
    assert isinstance(model.head, nn.Conv2d)
    assert {name: block.config.num_experts for name, block in blocks.items()} == {
        "stem": 4, "layer1.0": 2, "layer1.3": 4, "layer2.0": 2, "layer2.2": 4}


def test_each_block_owns_a_copy_of_the_config() -> None:
    config = MoEConfig(num_experts=4, top_k=2, losses={"switch": 0.01})
    model = convmoe.patch(toy(), targets=["stem", "head"], config=config)
    config.losses["switch"] = 1.0
    assert model.stem.config.losses == {"switch": 0.01}
    assert model.stem.config is not model.head.config


def test_patching_twice_accumulates_and_the_spec_lists_both() -> None:
    model = convmoe.patch(toy(), targets="stem", config=CONFIG)
    convmoe.patch(model, targets="head", config=MoEConfig(num_experts=2, top_k=1))
    spec = patch_spec(model)
    assert list(spec["modules"]) == ["stem", "head"]
    assert spec["modules"]["head"]["config"]["num_experts"] == 2


def test_moe_blocks_inside_the_definition_are_not_in_the_spec() -> None:
    model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3))
    convmoe.patch(model, targets="1", config=CONFIG)
    assert list(patch_spec(model)["modules"]) == ["1"]


def test_spec_round_trip_rebuilds_the_same_module_tree(x: torch.Tensor) -> None:
    model = convmoe.patch(toy(), targets=nn.Conv2d, config=MoEConfig(num_experts=3, top_k=2, tokens="grid:2x2"))
    with torch.no_grad():
        for block in patched_blocks(model).values():
            block.experts.weight.add_(torch.randn_like(block.experts.weight) * 0.1)  # "trained"
    spec = json.loads(json.dumps(patch_spec(model)))
    rebuilt = apply_spec(toy(), spec)
    assert [type(m).__name__ for m in rebuilt.modules()] == [type(m).__name__ for m in model.modules()]
    assert rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)
    assert {name: b.converter for name, b in patched_blocks(rebuilt).items()} == {name: "conv2d" for name in ALL_CONVS}


def test_apply_spec_on_the_meta_device() -> None:
    spec = patch_spec(convmoe.patch(toy(), targets="layer2.*", config=CONFIG))
    with torch.device("meta"):
        base = Toy()
    apply_spec(base, spec)
    assert base.layer2[0].experts.weight.device.type == "meta"
    assert sorted(base.state_dict()) == sorted(convmoe.patch(toy(), targets="layer2.*", config=CONFIG).state_dict())


def test_patched_model_deepcopies_and_pickles_without_extra_state(x: torch.Tensor) -> None:
    model = convmoe.patch(toy(), targets="*", config=CONFIG)
    model.train()
    (model(x).sum() + convmoe.aux_loss(model)).backward()
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not any("template" in key for key in model.state_dict())
    assert sorted(clone.state_dict()) == sorted(model.state_dict())
    assert type(loaded.layer2[2].dense_template) is nn.Conv2d


def test_wrapper_with_one_conv_stands_for_it() -> None:
    timm = pytest.importorskip("timm")
    model = nn.Sequential(timm.layers.ConvNormAct(3, 8, 3), nn.Conv2d(8, 8, 1))
    assert select_targets(model, "0").names == ["0.conv"]
    assert select_targets(model, timm.layers.ConvNormAct).names == ["0.conv"]


def test_mixed_conv_children_are_patched_without_a_warning(recwarn: pytest.WarningsRecorder) -> None:
    timm = pytest.importorskip("timm")
    mixed = timm.layers.MixedConv2d(8, 8, [3, 5], depthwise=True).eval()
    model = nn.Sequential(mixed)
    x = torch.randn(2, 8, 7, 7)
    expected = model(x)
    convmoe.patch(model, targets="0*", config=CONFIG)
    assert list(patched_blocks(model)) == ["0.0", "0.1"]
    assert not [w for w in recwarn if "patch()" in str(w.message)]
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


class DoubledConv(nn.Conv2d):
    """A conv subclass with its own forward: no built-in converter knows it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_register_converter_teaches_patch_a_new_conv(x: torch.Tensor) -> None:
    from convmoe.patch.converters import CONVERTERS

    def convert_doubled(module: nn.Module, config: MoEConfig, upcycle: bool) -> MoEConv2d | None:
        if not isinstance(module, DoubledConv):
            return None
        block = MoEConv2d(module.in_channels, module.out_channels, module.kernel_size, padding=module.padding,
                          config=config)
        if upcycle:
            block.upcycle_from(2 * module.weight, 2 * module.bias)
        return block

    model = nn.Sequential(DoubledConv(3, 4, 3, padding=1)).eval()
    expected = model(x)
    with pytest.raises(ValueError, match=r"overrides nn\.Conv2d's forward and no converter knows"):
        convmoe.patch(copy.deepcopy(model), targets="0", config=CONFIG)
    try:
        register_converter("doubled_conv", convert_doubled)
        assert next(iter(CONVERTERS)) == "doubled_conv"
        convmoe.patch(model, targets="0", config=CONFIG)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        spec = patch_spec(model)
        assert spec["modules"]["0"]["converter"] == "doubled_conv"
        rebuilt = apply_spec(nn.Sequential(DoubledConv(3, 4, 3, padding=1)), spec)
        assert rebuilt.load_state_dict(model.state_dict(), strict=True)
    finally:
        CONVERTERS.pop("doubled_conv", None)
    with pytest.raises(ValueError, match="unknown converter 'doubled_conv'; registered: timm_conv2d_same, conv2d"):
        apply_spec(nn.Sequential(DoubledConv(3, 4, 3, padding=1)), spec)


def test_callable_package_and_function_agree() -> None:
    from convmoe.patch import patch as patch_function

    assert callable(convmoe.patch)
    assert convmoe.patch.apply_spec is apply_spec
    a = convmoe.patch(toy(), "stem", CONFIG)
    b = patch_function(toy(), targets="stem", config=CONFIG)
    assert patch_spec(a) == patch_spec(b)
