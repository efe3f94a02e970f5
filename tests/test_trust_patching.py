"""patch() never fails silently and the accounting is right.

- aux_loss / routing_stats count every call of a block in the latest forward pass (shared FPN or
  RetinaNet heads), and only the blocks that ran in it (layer drop, early exit, a no-grad pass);
- blocks that never run are reported: a warning after the first training pass, an error with
  ``example_inputs``; ``last_stage`` follows smp's ``encoder_depth``;
- placements follow the main output, not auxiliary heads;
- ``dropout="medoe"`` drops experts without an explicit rate; every config number is validated;
- a misspelt placement is suggested.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import max_abs_diff
from torch import Tensor, nn

import convmoe
from convmoe import MoEConfig, MoEConv2d
from convmoe.patch.placements import is_auxiliary, last, last_stage
from convmoe.scope import add_forward_scope, get_forward_scope, remove_forward_scope

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ((9, 9), (5, 5), (3, 3))


class SharedHead(nn.Module):
    """A RetinaNet-style head: one conv applied to every pyramid level."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = head if head is not None else nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.stem(x)
        levels = [nn.functional.adaptive_avg_pool2d(features, size) for size in LEVELS]
        return [self.head(level) for level in levels]


def _levels_input(seed: int = 0) -> Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(seed))


def _per_call(model: SharedHead, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Each call's aux total and expert load, by calling the head outside any scope (each call replaces the last)."""
    block = model.head
    features = model.stem(x)
    totals, loads = [], []
    for size in LEVELS:
        block(nn.functional.adaptive_avg_pool2d(features, size))
        totals.append(block.last_aux.total)
        loads.append(block.last_routing.expert_load())
    return torch.stack(totals).sum(), loads


def _shared_models() -> dict[str, SharedHead]:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=4, top_k=1, losses={"switch": 0.5, "z": 0.1})
    patched = convmoe.patch(SharedHead(), targets="head", config=config, upcycle=False)
    plain = SharedHead(MoEConv2d(4, 4, 3, padding=1, config=config))
    return {"patched": patched, "plain": plain}


# -- 1. a block called several times in one forward pass --------------------------------------------------


@pytest.mark.parametrize("kind", ["patched", "plain"])
def test_a_shared_head_adds_every_call_to_aux_loss_and_routing_stats(kind: str) -> None:
    model = _shared_models()[kind].eval()
    x = _levels_input()
    if kind == "plain":  # a model built from MoEConv2d gets its scope from the first aux_loss call
        model(x)
        convmoe.aux_loss(model)
    with torch.no_grad():
        expected_total, loads = _per_call(model, x)
    for _ in range(2):  # the second pass starts afresh: the same numbers, not twice them
        model(x)
        torch.testing.assert_close(convmoe.aux_loss(model), expected_total)
        assert len(model.head.forward_routings) == len(LEVELS)
        stats = convmoe.routing_stats(model)["head"]
        load = torch.stack(loads).sum(dim=0)
        assert stats.tokens == 2 * sum(h * w for h, w in LEVELS)
        assert stats.utilization == pytest.approx((load / load.sum()).tolist(), abs=1e-6)
        assert stats.dead_experts == [e for e in range(4) if load[e] == 0]
    torch.testing.assert_close(model.head.last_aux.total, expected_total)  # the whole pass, documented


def test_a_shared_head_trains_with_the_loss_of_every_call() -> None:
    model = _shared_models()["patched"].train()
    x = _levels_input()
    model(x)
    aux = convmoe.aux_loss(model)
    aux.backward()
    grad = model.head.router.gate.proj.weight.grad.clone()
    model.zero_grad()
    expected, _ = _per_call(model, x)  # noise_std=0: the same routing
    expected.backward()
    torch.testing.assert_close(grad, model.head.router.gate.proj.weight.grad)


def test_global_routing_stats_counts_every_call() -> None:
    from convmoe.distributed import global_routing_stats

    model = _shared_models()["patched"].eval()
    model(_levels_input())
    local, global_ = convmoe.routing_stats(model)["head"], global_routing_stats(model)["head"]
    assert global_.tokens == local.tokens == 2 * sum(h * w for h, w in LEVELS)
    assert global_.utilization == pytest.approx(local.utilization, abs=1e-6)


def test_usage_folding_weighs_every_call() -> None:
    model = _shared_models()["patched"].eval()
    model(_levels_input())
    routings = model.head.forward_routings
    expected = sum(r.dense_weights().sum(dim=(0, 1)) for r in routings)
    report = convmoe.unpatch(model, how="usage")
    assert report.expert_weights["head"] == pytest.approx((expected / expected.sum()).tolist(), abs=1e-6)
    assert get_forward_scope(model) is None  # unpatch removes the scope with the last block


# -- 2. blocks that did not run in the latest forward pass -------------------------------------------------


class LayerDrop(nn.Module):
    """Two MoE convs; the second is skipped when ``skip`` is set (layer drop, early exit)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.first(x)
        return x if self.skip else self.second(x)


def _layer_drop(kind: str) -> LayerDrop:
    torch.manual_seed(0)
    model = LayerDrop()
    if kind == "patched":
        return convmoe.patch(model, targets=["first", "second"], config=MoEConfig(num_experts=4, top_k=1),
                             upcycle=False)
    model.first = MoEConv2d(3, 4, 3, padding=1, num_experts=4, top_k=1)
    model.second = MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=1)
    model(torch.randn(1, 3, 5, 5))
    convmoe.aux_loss(model)  # adds the scope: from the next pass on only blocks that ran count
    return model


def _train_then_skip(model: nn.Module, called: nn.Module) -> None:
    """Two training steps through ``called`` (the model or its wrapper), the second skipping ``second``."""
    x = torch.randn(2, 3, 7, 7)
    (called(x).square().mean() + convmoe.aux_loss(called)).backward()
    model.skip = True
    y = called(x)
    aux = convmoe.aux_loss(called)
    torch.testing.assert_close(aux, model.first.last_aux.total)
    (y.square().mean() + aux).backward()  # the old code backpropagated through the freed graph of step 1


@pytest.mark.parametrize("kind", ["patched", "plain"])
def test_a_skipped_block_adds_no_stale_loss_and_backward_works(kind: str) -> None:
    model = _layer_drop(kind).train()
    _train_then_skip(model, model)
    assert model.second.last_aux is None
    assert model.second.last_routing is None
    assert list(convmoe.routing_stats(model).blocks) == ["first"]


def test_global_routing_stats_leave_out_a_skipped_block() -> None:
    from convmoe.distributed import global_routing_stats

    model = _layer_drop("patched").eval()
    model(torch.randn(2, 3, 7, 7))
    model.skip = True
    model(torch.randn(2, 3, 7, 7))
    assert list(global_routing_stats(model).blocks) == ["first"]


@pytest.mark.parametrize("kind", ["patched", "plain"])
def test_a_no_grad_pass_leaves_nothing_for_the_next_training_step(kind: str) -> None:
    model = _layer_drop(kind)
    x = torch.randn(2, 3, 7, 7)
    model.eval()
    with torch.no_grad():
        model(x)  # validation: both blocks run without a graph
    model.train()
    model.skip = True
    model(x)
    aux = convmoe.aux_loss(model)
    assert aux.requires_grad
    torch.testing.assert_close(aux, model.first.last_aux.total)  # not + the stale, graph-less second block


def test_a_block_called_on_its_own_replaces_its_state() -> None:
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=2)
    block(torch.randn(1, 4, 5, 5))
    block(torch.randn(1, 4, 5, 5))
    assert block.forward_calls == 1


def test_the_scope_survives_deepcopy_pickle_and_adds_no_state_dict_key() -> None:
    model = _shared_models()["patched"].eval()
    assert remove_forward_scope(model)
    keys = list(model.state_dict())
    add_forward_scope(model)
    assert list(model.state_dict()) == keys
    x = _levels_input()
    model(x)
    expected = convmoe.aux_loss(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert get_forward_scope(clone) is not None
        assert get_forward_scope(clone) is not get_forward_scope(model)
        clone(x)
        assert len(clone.head.forward_routings) == len(LEVELS)
        torch.testing.assert_close(convmoe.aux_loss(clone), expected)
    assert len(model.head.forward_routings) == len(LEVELS)  # the copies never touched the original's blocks


def test_a_nested_scope_leaves_the_work_to_the_outer_one() -> None:
    """A scoped backbone run twice in one pass of a scoped model (siamese) keeps both calls."""
    torch.manual_seed(0)
    backbone = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2))
    add_forward_scope(backbone)
    siamese = nn.ModuleDict({"backbone": backbone})
    add_forward_scope(siamese)
    siamese.forward = lambda a, b: (backbone(a), backbone(b))  # type: ignore[method-assign]
    siamese(torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5))
    assert backbone[0].forward_calls == 2
    backbone(torch.randn(1, 3, 5, 5))  # on its own the backbone is the outer scope
    assert backbone[0].forward_calls == 1


def test_compiled_model_counts_every_call_and_skips_like_eager() -> None:
    torch._dynamo.reset()
    try:
        model = _shared_models()["patched"].train()
        compiled = torch.compile(model, backend="aot_eager")
        x = _levels_input()
        y, aux = model(x), convmoe.aux_loss(model)
        for _ in range(2):
            y_c = compiled(x)
            aux_c = convmoe.aux_loss(compiled)
            assert len(model.head.forward_routings) == len(LEVELS)
            assert max(max_abs_diff(a, b) for a, b in zip(y_c, y, strict=True)) < 1e-5
            assert max_abs_diff(aux_c, aux) < 1e-6
            aux_c.backward()
    finally:
        torch._dynamo.reset()


def test_aux_loss_of_a_single_process_ddp_wrapper(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _layer_drop("patched").train()
        _train_then_skip(model, DistributedDataParallel(model, find_unused_parameters=True))
    finally:
        dist.destroy_process_group()


# -- 3. blocks that never run --------------------------------------------------------------------------------


class DeadBranch(nn.Module):
    """``unused`` is registered but never called (like smp's layer4 at encoder_depth=3)."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.used(x))


def test_the_first_training_pass_warns_once_about_blocks_that_did_not_run() -> None:
    model = convmoe.patch(DeadBranch(), targets=["used", "unused"], config=MoEConfig(num_experts=2))
    x = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()(x)  # an eval pass is not the check
    with pytest.warns(UserWarning, match=r"1 MoE block\(s\) did not run in the first training forward pass of "
                                         r"DeadBranch: 'unused'; they get no routing, aux loss or gradient"):
        model.train()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once per model


def test_example_inputs_refuses_convs_that_never_run_and_leaves_the_model_unchanged() -> None:
    model = DeadBranch().train()
    model.norm.eval()  # a frozen norm inside a training model: its mode must come back as it was
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^patch\(\): targets \['used', 'unused'\] selected 1 conv\(s\) that an "
                                         r"eval-mode forward pass on example_inputs never calls: 'unused'; .*"
                                         r"Choose targets the forward pass uses .* The model is unchanged\.$"):
        convmoe.patch(model, targets=["used", "unused"], example_inputs=torch.randn(2, 3, 5, 5))
    assert type(model.used) is nn.Conv2d
    assert type(model.unused) is nn.Conv2d
    assert [model.training, model.norm.training, model.used.training] == [True, False, True]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert get_forward_scope(model) is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    convmoe.patch(model, targets="used", example_inputs=(torch.randn(2, 3, 5, 5),))
    assert isinstance(model.used, MoEConv2d)
    assert model.used.last_routing is None  # the dry run leaves no state
    assert [model.training, model.norm.training] == [True, False]


@pytest.mark.parametrize(("encoder", "depth", "prefix"), [
    ("resnet18", 3, "encoder.layer2."),
    ("resnet18", 4, "encoder.layer3."),
    ("resnet18", 5, "encoder.layer4."),
    ("tu-test_resnet", 3, "encoder.model.layer2."),
    ("tu-test_resnet", 4, "encoder.model.layer3."),
    ("mobilenet_v2", 3, "encoder.features.6."),  # smp runs features 7-13 at depth 3 but drops them
])
def test_last_stage_is_the_deepest_stage_the_encoder_uses(encoder: str, depth: int, prefix: str) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet(encoder, encoder_weights=None, encoder_depth=depth, decoder_channels=(16,) * depth)
    stage = last_stage(model)
    assert stage
    assert all(name.startswith(prefix) for name in stage), stage
    x = torch.randn(1, 3, 64, 64)
    convmoe.patch(model, targets="last_stage", config=MoEConfig(num_experts=2, top_k=1), example_inputs=x)
    model.train()(x)
    assert set(convmoe.routing_stats(model).blocks) == set(stage)


def test_pspnet_default_last_stage_runs() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.PSPNet(encoder_name="resnet18", encoder_weights=None)  # encoder_depth=3
    assert all(name.startswith("encoder.layer2.") for name in last_stage(model))
    with pytest.raises(ValueError, match=r"never calls: 'encoder\.layer4\.0\.conv1', .* The model is unchanged"):
        convmoe.patch(model, targets="encoder.layer4.*", example_inputs=torch.randn(1, 3, 64, 64))


def test_last_skips_smp_encoder_convs_the_encoder_does_not_use() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Linknet("resnet18", encoder_weights=None, encoder_depth=3)
    assert last(model) == ["encoder.layer2.1.conv2"]  # not layer4 (never run); the decoder has no k x k conv


# -- 4. placements follow the main output --------------------------------------------------------------------


def test_last_skips_torchvision_auxiliary_classifiers() -> None:
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True,
                                                      num_classes=3)
    assert last(model) == ["classifier.1"]  # the DeepLabHead's 3x3 conv, not aux_classifier.0


class WithAuxHead(nn.Module):
    """Auxiliary heads registered after the main path, as torchvision and mmseg do."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 3, 1))
        self.decoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
        self.decoder.add_module("aux_head", nn.Conv2d(4, 4, 1))
        self.auxiliary_head = nn.Sequential(nn.Conv2d(4, 4, 3))


def test_auxiliary_heads_are_skipped_by_every_placement() -> None:
    assert [is_auxiliary(n) for n in ("aux_classifier.0", "auxlayer.conv", "head.seg_aux.0", "decoder.auxiliary",
                                      "layer4.0.conv2", "maxpool", "aux")] == [True, True, True, True, False, False,
                                                                              True]
    model = WithAuxHead()
    assert last(model) == ["decoder.0"]
    assert convmoe.patch.select_targets(model, "decoder_last").names == ["decoder.1"]


# -- 5. MEDoE without an explicit rate -------------------------------------------------------------------------


def test_medoe_without_a_rate_uses_its_default_and_zero_stays_zero() -> None:
    config = MoEConfig(num_experts=10, top_k=1, dropout="medoe")
    assert config.drop_rate is None
    block = MoEConv2d(4, 4, 1, config=config).train()
    assert block.dropout.drop_rate == 0.1
    block(torch.randn(1, 4, 3, 3))
    assert int((~block.last_routing.expert_mask).sum()) == 1  # round(0.1 * 10)
    off = MoEConv2d(4, 4, 1, config=config.replace(drop_rate=0.0)).train()
    off(torch.randn(1, 4, 3, 3))
    assert off.last_routing.expert_mask is None
    for value in (config, config.replace(drop_rate=0.0), config.replace(drop_rate=0.3)):
        assert MoEConfig.from_json(value.to_json()) == value
    saved = {**config.to_dict(), "drop_rate": 0.0}  # written before None meant "the policy's default"
    assert MoEConfig.from_dict(saved).drop_rate == 0.0


def test_saved_zoo_configs_build_the_same_dropout() -> None:
    def configs(node: object):
        if isinstance(node, dict):
            if "num_experts" in node and "drop_rate" in node:
                yield node
            for value in node.values():
                yield from configs(value)

    found = [entry for path in sorted(ROOT.glob("zoo/*/config.json"))
             for entry in configs(json.loads(path.read_text()))]
    assert found
    for entry in found:
        block = MoEConv2d(4, 4, 1, config=MoEConfig.from_dict(entry))
        if entry["dropout"] is None:
            assert block.dropout is None
        else:
            assert block.dropout.drop_rate == entry["drop_rate"]


# -- 6. config validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"temperature": float("nan")}, ValueError, r"MoEConfig\.temperature=nan must be a finite number; 1\.0 is"),
    ({"temperature": float("inf")}, ValueError, r"temperature=inf must be a finite number"),
    ({"temperature": None}, TypeError, r"MoEConfig\.temperature=None \(NoneType\) must be a number"),
    ({"capacity_factor": float("inf")}, ValueError, r"capacity_factor=inf must be a finite number; e\.g\. 1\.25"),
    ({"capacity_factor": "1.25"}, TypeError, r"capacity_factor='1\.25' \(str\) must be a number"),
    ({"noise_std": float("nan")}, ValueError, r"noise_std=nan must be a finite number"),
    ({"noise_std": True}, TypeError, r"noise_std=True \(bool\) must be a number"),
    ({"losses": None}, TypeError, r"MoEConfig\.losses=None must be a dict of loss name -> weight.*use \{\}"),
    ({"losses": {"switch": float("nan")}}, ValueError, r"losses\['switch'\]=nan must be a finite number"),
    ({"losses": {"switch": "0.01"}}, TypeError, r"losses\['switch'\]='0\.01' \(str\) must be a number"),
    ({"num_experts": True}, TypeError, r"MoEConfig\.num_experts=True \(bool\) must be an int"),
    ({"num_experts": "8"}, TypeError, r"num_experts='8' \(str\) must be an int"),
    ({"top_k": True}, TypeError, r"top_k=True \(bool\) must be an int"),
    ({"top_k": 1.5}, ValueError, r"top_k=1\.5 must be a positive int"),
    ({"dropout": "medoe", "drop_rate": float("nan")}, ValueError, r"drop_rate=nan must be a finite number"),
    ({"dropout": "medoe", "drop_rate": 1.0}, ValueError, r"drop_rate=1\.0 must be in \[0, 1\)"),
    ({"upcycle_noise_std": -1.0}, ValueError, r"upcycle_noise_std=-1\.0 must be >= 0"),
    ({"upcycle_noise_std": float("inf")}, ValueError, r"upcycle_noise_std=inf must be a finite number"),
    ({"shared_expert": "yes"}, TypeError, r"shared_expert='yes' must be True or False"),
    ({"router": None}, TypeError, r"MoEConfig\.router=None: give a registered name \(expert_choice, "),
    ({"tokens": None}, TypeError, r"MoEConfig\.tokens=None: give a registered name"),
    ({"expert_norm": "batch"}, ValueError, r"unknown expert norm 'batch' \(MoEConfig\.expert_norm\); available: layer"),
    ({"expert_act": "tanh"}, ValueError, r"expert activation 'tanh' \(MoEConfig\.expert_act\); available: gelu, relu, "),
    ({"router_kwargs": None}, TypeError, r"router_kwargs=None must be a dict of keyword arguments"),
])
def test_every_config_field_is_validated(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        MoEConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_numbers_from_numpy_are_plain_and_round_trip() -> None:
    config = MoEConfig(num_experts=np.int64(4), top_k=np.int32(1), temperature=np.float32(0.5),
                       losses={"switch": 0.01})
    assert type(config.num_experts) is int
    assert type(config.temperature) is float
    assert MoEConfig.from_json(config.to_json()) == config
    assert math.isclose(config.temperature, 0.5)


# -- 7. a misspelt placement ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "placement"), [
    ("last-stage", "last_stage"), ("Last Stage", "last_stage"), ("decoder-last", "decoder_last"), ("fusoin", "fusion"),
])
def test_a_misspelt_placement_is_suggested(spec: str, placement: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=rf"^patch\(\): targets '{spec}' matched no module; did you mean the "
                                         rf"placement '{placement}'\? Placements: decoder_last, fusion, last, "
                                         r"last_stage, last_stage_pointwise\.$"):
        convmoe.patch(model, targets=spec)


def test_a_misspelt_module_name_still_lists_module_names() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"targets '3' matched no module; closest names: "):
        convmoe.patch(model, targets="3")
