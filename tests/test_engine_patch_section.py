"""The engine's ``patch`` section: convmoe.patch on a recipe's model after its weights are loaded, so the experts
start as copies of the pretrained convs; checkpoints, ``convmoe eval`` and save_pretrained rebuild the same model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import segmentation_config
from test_freeze import engine_config

import convmoe
from convmoe.block import named_blocks
from convmoe.engine import Trainer, load_model
from convmoe.engine.config_check import check_patch, check_training_config
from convmoe.engine.model_build import build_model
from convmoe.zoo.weights import base_recipe_for

LAYER4 = "re:encoder\\.model\\.layer4\\..*conv.*"


def upernet_config(out: Path, patch: dict[str, Any] | None) -> dict[str, Any]:
    """A dense smp UPerNet on a tu-test_resnet encoder whose weights come from init_encoder_from."""
    config = segmentation_config(out)
    config["model"] = {"_target_": "segmentation_models_pytorch.UPerNet", "encoder_name": "tu-test_resnet",
                       "encoder_weights": None, "in_channels": 3, "classes": 11, "decoder_channels": 16}
    config["init_encoder_from"] = {"_target_": "timm.create_model", "model_name": "test_resnet"}
    if patch is not None:
        config["patch"] = patch
    return config


def test_patch_section_upcycles_the_loaded_encoder_weights(tmp_path):
    patch = {"targets": LAYER4, "config": {"num_experts": 4, "top_k": 2, "tokens": "image"}}
    dense = Trainer(upernet_config(tmp_path / "dense", None)).model
    patched = Trainer(upernet_config(tmp_path / "moe", patch)).model
    blocks = named_blocks(patched)
    assert blocks
    assert all(name.startswith("encoder.model.layer4.") for name in blocks)
    dense_modules = dict(dense.named_modules())
    for name, block in blocks.items():
        weight = dense_modules[name].weight  # the backbone's loaded weight, not the encoder's random one
        experts = block.experts.weight
        assert all(torch.equal(experts[e].to(weight.dtype), weight) for e in range(experts.shape[0])), name
    x = torch.randn(2, 3, 64, 96).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(patched.eval()(x), dense.eval()(x), rtol=1e-4, atol=1e-5)


def test_checkpoint_eval_and_save_pretrained_rebuild_the_patched_model(tmp_path):
    config = engine_config(tmp_path, None, moe=False)
    config["patch"] = {"targets": "last_stage", "config": {"num_experts": 4, "top_k": 1, "losses": {"switch": 0.01}}}
    trainer = Trainer(config)
    trainer.fit()
    trained = trainer.model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = trained(x)
    loaded, train_config = load_model(tmp_path / "checkpoints" / "last.pt")
    assert set(named_blocks(loaded)) == set(named_blocks(trained))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
    folder = convmoe.save_pretrained(loaded, tmp_path / "saved", base=base_recipe_for(train_config["model"]))
    with torch.no_grad():
        torch.testing.assert_close(convmoe.from_pretrained(folder)(x), expected)


def test_build_model_without_weights_gives_fresh_experts_of_the_same_shapes():
    config = engine_config(Path("unused"), None, moe=False)
    config["patch"] = {"targets": "last_stage", "config": {"num_experts": 4, "top_k": 1}}
    torch.manual_seed(0)
    started = build_model(copy.deepcopy(config))
    torch.manual_seed(0)
    rebuilt = build_model(copy.deepcopy(config), pretrained=False)
    shapes = {k: v.shape for k, v in started.state_dict().items()}
    assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}
    block = next(iter(named_blocks(rebuilt).values()))
    assert not all(torch.equal(block.experts.weight[0], block.experts.weight[e]) for e in range(1, 4))


@pytest.mark.parametrize(("section", "message"), [
    ("last_stage", "patch='last_stage' must be a mapping"),
    ({}, "patch has no targets"),
    ({"targets": "last_stage", "confg": {}}, "did you mean 'config'"),
    ({"targets": 3}, "patch.targets=3 must be"),
    ({"targets": "last_stage", "upcycle": "yes"}, "patch.upcycle"),
    ({"targets": "last_stage", "config": {"num_expert": 4}}, "num_expert"),
])
def test_patch_section_is_checked_before_anything_is_built(section, message):
    config = engine_config(Path("unused"), None, moe=False) | {"patch": section}
    with pytest.raises(ValueError, match=message) as error:
        check_training_config(config)
    assert "\n" not in str(error.value)


def test_a_target_that_matches_nothing_is_named(tmp_path):
    config = engine_config(tmp_path, None, moe=False) | {"patch": {"targets": "layer9.*"}}
    with pytest.raises(ValueError, match="matched no module"):
        Trainer(config)


def test_check_patch_returns_the_keywords_of_convmoe_patch():
    assert check_patch({"targets": ["layer4.*"], "config": "upernet_fusion_moe"}) == {
        "targets": ["layer4.*"], "config": "upernet_fusion_moe"}
    assert check_patch(None) is None


def test_a_published_smp_model_with_a_patched_encoder_loads_with_its_blocks(tmp_path):
    """What ``convmoe zoo publish`` writes for a recipe with a patch section on smp's UPerNet: ``convmoe eval`` of
    the folder (load_model) and from_pretrained both rebuild the patched encoder."""
    config = upernet_config(tmp_path, {"targets": LAYER4, "config": {"num_experts": 4, "top_k": 2, "tokens": "image"}})
    torch.manual_seed(0)
    model = build_model(config).eval()
    folder = convmoe.save_pretrained(model, tmp_path / "saved", base=base_recipe_for(config["model"]))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        for loaded in (load_model(str(folder))[0], convmoe.from_pretrained(folder)):
            assert set(named_blocks(loaded)) == set(named_blocks(model))
            torch.testing.assert_close(loaded(x), expected)
