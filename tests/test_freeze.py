"""freeze_base: gradients reach exactly the experts, routers and named modules; norm statistics; errors; engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import convmoe
from convmoe.engine import Trainer, TrainerSettings
from convmoe.engine.config_check import check_training_config

CONFIG = convmoe.MoEConfig(num_experts=4, top_k=1)


def patched_timm() -> nn.Module:
    model = timm.create_model("test_resnet", num_classes=5, zero_init_last=False)  # gradients reach the experts
    convmoe.patch(model, targets="last_stage", config=CONFIG)
    return model


def patched_unet() -> nn.Module:
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("tu-test_resnet", encoder_weights=None, classes=3, decoder_channels=(16, 16, 16, 16, 16))
    for module in model.modules():  # timm zero-inits each block's last norm: no gradient would reach the experts
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    convmoe.patch(model, targets="last_stage", config=CONFIG)
    return model


def expected_trainable(model: nn.Module, train_prefixes: tuple[str, ...]) -> set[str]:
    """By name: the experts, shared experts and routers of every block, and everything under the prefixes."""
    blocks = [name for name, _ in convmoe.moe_blocks(model)]
    parts = tuple(f"{block}.{part}." for block in blocks for part in ("experts", "shared_expert", "router"))
    prefixes = tuple(f"{prefix}." for prefix in train_prefixes)
    return {name for name, _ in model.named_parameters() if name.startswith(parts + prefixes)}


CASES = [
    pytest.param(patched_timm, "fc", ("fc",), (2, 3, 32, 32), id="timm-test_resnet"),
    pytest.param(patched_unet, ["decoder.*", "segmentation_head"], ("decoder", "segmentation_head"), (2, 3, 64, 64),
                 id="smp-unet"),
]


@pytest.mark.parametrize(("build", "train", "prefixes", "shape"), CASES)
def test_gradients_reach_exactly_experts_routers_and_named_modules(build, train, prefixes, shape):
    model = build()
    summary = convmoe.freeze_base(model, train=train)
    expected = expected_trainable(model, prefixes)
    assert set(summary.trainable) == expected
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected

    model.train()
    loss = model(torch.randn(shape)).square().mean() + convmoe.aux_loss(model)
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    assert any(".router." in name for name in with_grad)
    assert any(".experts." in name for name in with_grad)


@pytest.mark.parametrize(("build", "train", "prefixes", "shape"), CASES)
def test_optimizer_of_trainable_parameters_steps_only_them(build, train, prefixes, shape):
    model = build()
    convmoe.freeze_base(model, train=train)
    optimizer = torch.optim.SGD(filter(lambda p: p.requires_grad, model.parameters()), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    model(torch.randn(shape)).square().mean().backward()
    optimizer.step()

    trainable = expected_trainable(model, prefixes)
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(trainable)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= trainable
    assert any(".experts." in name for name in changed)
    assert any(name.startswith(prefixes) for name in changed)


def test_summary_counts_and_peft_line(capsys):
    model = patched_timm()
    summary = convmoe.freeze_base(model, train="fc")
    assert capsys.readouterr().out == ""  # prints nothing by default
    parameters = list(model.parameters())
    assert summary.all_params == sum(p.numel() for p in parameters)
    assert summary.trainable_params == sum(p.numel() for p in parameters if p.requires_grad)
    assert summary.moe_blocks == ["layer4.0.conv1", "layer4.0.conv2"]
    assert summary.train_modules == ["fc"]
    assert len(summary.trainable) + len(summary.frozen) == len(list(model.named_parameters()))

    convmoe.print_trainable_parameters(model)
    percent = 100 * summary.trainable_params / summary.all_params
    line = (f"trainable params: {summary.trainable_params:,d} || all params: {summary.all_params:,d} || "
            f"trainable%: {percent:.4f}")
    assert capsys.readouterr().out == line + "\n"
    assert str(summary) == line


def test_train_accepts_regex_and_a_second_call_starts_over():
    model = patched_timm()
    convmoe.freeze_base(model, train=["re:layer1\\..*", "fc"])
    assert model.layer1[0].conv1.weight.requires_grad
    summary = convmoe.freeze_base(model)
    assert summary.train_modules == []
    assert not model.layer1[0].conv1.weight.requires_grad
    assert not model.fc.weight.requires_grad
    assert model.layer4[0].conv2.experts.weight.requires_grad


def test_frozen_norms_keep_running_statistics_by_default():
    model = patched_timm()
    convmoe.freeze_base(model, train="fc")
    model.train()
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert model.bn1.training
    assert not torch.equal(model.bn1.running_mean, before)


def test_freeze_norm_stats_holds_frozen_norms_in_eval_across_train():
    model = patched_timm()
    summary = convmoe.freeze_base(model, train="fc", freeze_norm_stats=True)
    assert "bn1" in summary.frozen_norms
    assert "layer4.0.bn2" in summary.frozen_norms
    model.train()  # the usual call at the start of every epoch
    stats = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(buffer, stats[name]) for name, buffer in model.named_buffers())
    assert not model.bn1.training
    assert not model.layer4[0].bn2.training
    assert model.training
    assert model.fc.training

    convmoe.freeze_base(model, train="fc")  # starts over: the norms follow the model again
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert model.bn1.training
    assert not torch.equal(model.bn1.running_mean, stats["bn1.running_mean"])


def test_freeze_norm_stats_leaves_norms_of_trained_modules_alone():
    model = patched_unet()
    summary = convmoe.freeze_base(model, train="decoder", freeze_norm_stats=True)
    assert summary.frozen_norms
    assert not any(name.startswith("decoder.") for name in summary.frozen_norms)
    model.train()
    model(torch.randn(2, 3, 64, 64))
    norms = [m for name, m in model.named_modules() if name.startswith("decoder.") and isinstance(m, nn.BatchNorm2d)]
    assert norms
    assert all(norm.training for norm in norms)


def test_unmatched_train_name_names_the_closest_modules():
    model = patched_timm()
    with pytest.raises(ValueError, match=r"^freeze_base\(\): train 'fcc' matched no module; closest names: 'fc'\.$"):
        convmoe.freeze_base(model, train=["fc", "fcc"])
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


def test_bad_train_type_is_named():
    with pytest.raises(TypeError, match=r"^freeze_base\(\): train must be"):
        convmoe.freeze_base(patched_timm(), train=3)


def test_model_without_moe_block_says_to_patch_first():
    with pytest.raises(ValueError, match=r"no MoE block.*patch it first"):
        convmoe.freeze_base(timm.create_model("test_resnet"))


# ---- the engine ---------------------------------------------------------------------------------------


def engine_config(out: Path, freeze: object, section: str = "freeze_base", moe: bool = True) -> dict:
    """test_resnet on the CIFAR-10 fixture, one step; ``freeze`` as the config's ``section``."""
    fixtures = Path(__file__).parent / "fixtures" / "cifar-10-batches-py"
    model = {"_target_": "convmoe.models.create_classifier", "model_name": "test_resnet", "num_classes": 10}
    if moe:
        model |= {"moe_targets": "last_stage", "moe_config": {"num_experts": 4, "top_k": 1}}
    return {
        "model": model,
        section: freeze,
        "loss": {"_target_": "torch.nn.CrossEntropyLoss"},
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.05},
        "trainer": {"max_epochs": 1, "default_root_dir": str(out), "enable_progress_bar": False,
                    "track_routing": False, "limit_train_batches": 1},
        "data_loader": {"batch_size": 10, "num_workers": 0},
        "train_dataset": {"_target_": "convmoe.data.CIFAR10Dataset", "root": str(fixtures), "split": "train"},
    }


def test_engine_freezes_before_building_the_optimizer(tmp_path, capsys):
    trainer = Trainer(engine_config(tmp_path, {"train": ["fc"], "freeze_norm_stats": True}))
    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(optimized) == len(trainable)
    assert {id(p) for p in optimized} == {id(p) for p in trainable}
    assert not model.conv1[0].weight.requires_grad
    assert model.fc.weight.requires_grad
    assert "trainable params:" in capsys.readouterr().out

    before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    stats = model.bn1.running_mean.clone()
    trainer.fit()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)
    assert torch.equal(model.bn1.running_mean, stats)


@pytest.mark.parametrize(("freeze", "message"), [
    ("fc", r"freeze_base='fc' must be a mapping"),
    ({"trian": ["fc"]}, r"freeze_base has no setting 'trian' \(did you mean 'train'\?\)"),
    ({"freeze_norm_stats": "yes"}, r"freeze_base.freeze_norm_stats='yes' must be a bool"),
    ({"train": 3}, r"freeze_base.train=3 must be a string or a list of strings"),
])
def test_engine_config_is_checked(tmp_path, freeze, message):
    with pytest.raises(ValueError, match=message):
        check_training_config(engine_config(tmp_path, freeze), TrainerSettings)  # what `convmoe train` checks first
    with pytest.raises(ValueError, match=message):
        Trainer(engine_config(tmp_path, freeze))
