"""convmoe.freeze_modules: the same frozen stages for any model, dense or patched, and the engine's ``freeze``."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from test_freeze import engine_config as freeze_base_engine_config
from torch import nn

import convmoe
from convmoe.engine import Trainer, TrainerSettings
from convmoe.engine.config_check import check_training_config

FROZEN = ["conv1", "bn1", "layer1", "layer2.*"]
FROZEN_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.")


def dense() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=5, zero_init_last=False)


def moe_twin() -> nn.Module:
    model = dense()
    convmoe.patch(model, targets="last_stage", config=convmoe.MoEConfig(num_experts=4, top_k=1))
    return model


@pytest.mark.parametrize("build", [dense, moe_twin], ids=["dense", "moe"])
def test_freezes_exactly_the_named_modules_and_a_step_moves_only_the_rest(build):
    model = build()
    summary = convmoe.freeze_modules(model, FROZEN)
    expected_frozen = {name for name, _ in model.named_parameters() if name.startswith(FROZEN_PREFIXES)}
    assert set(summary.frozen) == expected_frozen
    assert set(summary.trainable) == {name for name, _ in model.named_parameters()} - expected_frozen
    assert summary.frozen_modules[:3] == ["conv1", "bn1", "layer1"]
    assert summary.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(filter(lambda p: p.requires_grad, model.parameters()), lr=0.1)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name in expected_frozen:
            assert parameter.grad is None, name
            assert torch.equal(parameter, before[name]), name
    assert not torch.equal(model.fc.weight, before["fc.weight"])


def test_dense_and_moe_twins_freeze_the_same_parameters():
    frozen_dense = convmoe.freeze_modules(dense(), FROZEN).frozen
    frozen_moe = convmoe.freeze_modules(moe_twin(), FROZEN).frozen
    assert frozen_dense == frozen_moe


def test_a_frozen_prefix_builds_no_graph():
    model = dense()
    convmoe.freeze_modules(model, FROZEN)
    seen = {}

    def record(key: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen[key] = out.requires_grad
        return hook

    model.layer2.register_forward_hook(record("prefix"))
    model.layer3.register_forward_hook(record("next"))
    model.train()(torch.randn(2, 3, 32, 32))
    assert seen == {"prefix": False, "next": True}


def test_freeze_norm_stats_holds_only_the_frozen_norms():
    model = dense()
    summary = convmoe.freeze_modules(model, FROZEN, freeze_norm_stats=True)
    assert "bn1" in summary.frozen_norms
    assert "layer3.0.bn1" not in summary.frozen_norms
    frozen_stats, trained_stats = model.bn1.running_mean.clone(), model.layer3[0].bn1.running_mean.clone()
    model.train()(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, frozen_stats)
    assert not torch.equal(model.layer3[0].bn1.running_mean, trained_stats)
    assert not model.bn1.training
    assert model.layer3[0].bn1.training


def test_composes_with_freeze_base_and_keeps_its_held_norms():
    model = moe_twin()
    base = convmoe.freeze_base(model, train="fc", freeze_norm_stats=True)
    block = base.moe_blocks[0]
    summary = convmoe.freeze_modules(model, block)
    assert not any(name.startswith(f"{block}.") for name in summary.trainable)
    assert "fc.weight" in summary.trainable
    assert set(base.frozen_norms) <= set(summary.frozen_norms)
    model.train()(torch.randn(2, 3, 32, 32))  # the hook puts held norms back in eval before their forward
    assert not model.bn1.training


@pytest.mark.parametrize(("modules", "error", "message"), [
    (["layr1"], ValueError, r"freeze_modules\(\): modules 'layr1' matched no module; closest names: .*layer1"),
    ([], ValueError, r"freeze_modules\(\): no module named; pass the modules to freeze"),
    ([3], TypeError, r"freeze_modules\(\)"),
])
def test_bad_names_get_one_line_errors(modules, error, message):
    model = dense()
    with pytest.raises(error, match=message):
        convmoe.freeze_modules(model, modules)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed


# ---- the engine ---------------------------------------------------------------------------------------


def engine_config(out: Path, freeze: object, moe: bool) -> dict:
    return freeze_base_engine_config(out, freeze, section="freeze", moe=moe)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_engine_freezes_the_same_stages_of_a_model_and_its_twin(tmp_path, capsys, moe):
    trainer = Trainer(engine_config(tmp_path, {"modules": FROZEN, "freeze_norm_stats": True}, moe))
    model = trainer.model
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert "freeze: trainable params:" in capsys.readouterr().out
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith(FROZEN_PREFIXES)}
    stats = model.bn1.running_mean.clone()
    trainer.fit()
    assert before
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)
    assert torch.equal(model.bn1.running_mean, stats)


@pytest.mark.parametrize(("freeze", "message"), [
    ("conv1", r"freeze='conv1' must be a mapping"),
    ({"modules": []}, r"freeze has no modules; name the modules to freeze"),
    ({"module": ["conv1"]}, r"freeze has no setting 'module' \(did you mean 'modules'\?\)"),
    ({"modules": ["conv1"], "freeze_norm_stats": "yes"}, r"freeze.freeze_norm_stats='yes' must be a bool"),
    ({"modules": 3}, r"freeze.modules=3 must be a string or a list of strings"),
])
def test_engine_freeze_section_is_checked(tmp_path, freeze, message):
    with pytest.raises(ValueError, match=message):
        check_training_config(engine_config(tmp_path, freeze, moe=False), TrainerSettings)
    with pytest.raises(ValueError, match=message):
        Trainer(engine_config(tmp_path, freeze, moe=False))


def test_engine_unmatched_module_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=r"freeze_modules\(\): modules 'layr1' matched no module") as info:
        Trainer(engine_config(tmp_path, {"modules": ["layr1"]}, moe=False))
    assert "\n" not in str(info.value)
