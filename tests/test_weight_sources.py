"""Rebuilding a saved model reads no other file and downloads nothing, whatever its recipe's keywords say.

A recipe from a downloaded ``config.json`` (or a training checkpoint's config) names builders from the
allow-list, but its keywords could still point them at a weight file (timm's ``checkpoint_path``, also
reached through smp's ``tu-`` encoders), ask for pretrained weights (``pretrained``, ``encoder_weights``)
or name a model on the Hub. The allow-list itself holds model builders only, not every callable in
``convmoe.models``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import convmoe
from convmoe.engine.model_build import build_model
from convmoe.engine.saved_models import load_saved_model
from convmoe.factory import BaseRecipe
from convmoe.hub import CONFIG_NAME, from_pretrained, save_pretrained
from convmoe.trust import UntrustedCodeError, is_trusted_factory
from convmoe.weight_sources import without_weight_sources

MISSING_FILE = "/nonexistent/convmoe-weights.pth"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _zeros_file(tmp_path: Path, model: torch.nn.Module) -> str:
    """A weight file that would zero every tensor of ``model`` if anything loaded it."""
    path = tmp_path / "zeros.pth"
    torch.save({name: torch.zeros_like(t) for name, t in model.state_dict().items()}, path)
    return str(path)


def _nonzero(model: torch.nn.Module) -> bool:
    return all(t.abs().sum() > 0 for name, t in model.state_dict().items() if name.endswith("conv1.weight"))


def test_the_switches_are_set_off_and_file_keywords_dropped():
    kwargs = {"pretrained": True, "checkpoint_path": "/x", "pretrained_cfg_overlay": {"file": "/x"},
              "weights": "DEFAULT", "num_classes": 3}
    assert without_weight_sources(kwargs) == {"pretrained": False, "weights": None, "num_classes": 3}

    def build(encoder_name: str, encoder_weights: str | None = "imagenet", **rest):
        return None

    assert without_weight_sources({"encoder_name": "x"}, build) == {"encoder_name": "x", "encoder_weights": None}


def test_an_smp_recipe_does_not_pass_a_weight_file_to_its_timm_encoder(tmp_path, offline):
    recipe = BaseRecipe("smp", "Unet", {"encoder_name": "tu-test_resnet", "encoder_depth": 3,
                                        "decoder_channels": [16, 8, 4], "classes": 2})
    zeros = _zeros_file(tmp_path, recipe.build().encoder.model)
    poisoned = BaseRecipe("smp", "Unet", {**recipe.kwargs, "checkpoint_path": zeros})
    assert _nonzero(poisoned.build().encoder.model)
    assert _nonzero(BaseRecipe("smp", "Unet", {**recipe.kwargs, "checkpoint_path": MISSING_FILE}).build().encoder.model)


@pytest.mark.parametrize("kwargs", [{"pretrained": True}, {"checkpoint_path": MISSING_FILE},
                                    {"pretrained_cfg_overlay": {"file": MISSING_FILE}}])
def test_a_trusted_factory_recipe_loads_no_weights(kwargs, offline):
    recipe = BaseRecipe("factory", "convmoe.models.classification:create_classifier",
                        {"model_name": "test_resnet", "num_classes": 3, **kwargs})
    assert recipe.build().fc.out_features == 3


def test_upernet_from_a_recipe_without_encoder_weights_downloads_nothing(offline):
    # UPerNetMoE's encoder_weights defaults to "imagenet": left out of the recipe, it must still be switched off.
    recipe = BaseRecipe("factory", "convmoe.models:UPerNetMoE",
                        {"encoder_name": "tu-test_resnet", "encoder_depth": 3, "classes": 2, "decoder_channels": 8,
                         "moe_num_experts": 2})
    assert type(recipe.build()).__name__ == "UPerNetMoE"


@pytest.mark.parametrize("name", ["convmoe.models.upernet:UPerNetMoE.from_pretrained",
                                  "convmoe.models.upernet:UPerNetMoE.mro", "convmoe.models:load_encoder_weights",
                                  "convmoe.models:resolve_moe_config", "convmoe.models.upernet:replace_conv_with_moe"])
def test_only_model_builders_of_convmoe_models_are_trusted(name):
    assert not is_trusted_factory(name)
    with pytest.raises(UntrustedCodeError, match="nothing was run"):
        BaseRecipe("factory", name, {"pretrained_model_name_or_path": "evil-org/evil-repo"}).build()


@pytest.mark.parametrize("name", ["convmoe.models:create_classifier", "convmoe.models.upernet:UPerNetMoE",
                                  "convmoe.models:UPerNetMEDoE"])
def test_the_model_builders_stay_trusted(name):
    assert is_trusted_factory(name)


@pytest.mark.parametrize(("library", "name", "kwargs"), [
    ("smp", "Unet", {"encoder_name": "tu-hf-hub:evil-org/net", "classes": 2}),
    ("factory", "convmoe.models:create_classifier", {"model_name": "hf-hub:evil-org/net", "num_classes": 2}),
])
def test_a_model_named_on_the_hub_is_refused_before_any_request(library, name, kwargs, offline):
    with pytest.raises(ValueError, match=r"config.json names the Hub model '.*evil-org/net'.*cannot be rebuilt offline"):
        BaseRecipe(library, name, kwargs).build(where="config.json")


@pytest.mark.parametrize(("library", "name", "kwargs", "cause"), [
    ("timm", "test_resnet", {"evil": "x"}, "unexpected keyword argument 'evil'"),
    ("smp", "os.system", {}, "os.system"),
])
def test_a_recipe_its_library_rejects_is_one_line_naming_the_file(library, name, kwargs, cause):
    with pytest.raises(ValueError, match=r"config\.json: cannot build the base model") as caught:
        BaseRecipe(library, name, kwargs).build(where="config.json")
    message = str(caught.value)
    assert cause in message
    assert "\n" not in message
    assert "fix the 'base' recipe" in message


def test_from_pretrained_ignores_a_weight_file_named_in_config_json(tmp_path, offline):
    model = convmoe.create_model("timm:test_resnet", num_classes=3).eval()
    folder = save_pretrained(model, tmp_path / "folder")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["base"]["kwargs"]["checkpoint_path"] = _zeros_file(tmp_path, model)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(from_pretrained(folder)(x), model(x))


def test_a_checkpoint_config_rebuilds_without_weight_sources(offline):
    node = {"_target_": "convmoe.models.UPerNetMoE", "encoder_name": "tu-test_resnet", "encoder_depth": 3,
            "classes": 2, "decoder_channels": 8, "moe_num_experts": 2}
    assert type(build_model({"model": node}, pretrained=False)).__name__ == "UPerNetMoE"
    timm_node = {"_target_": "timm.create_model", "model_name": "test_resnet", "checkpoint_path": MISSING_FILE}
    assert build_model({"model": timm_node}, pretrained=False).num_classes == 1000


def test_a_saved_model_class_that_is_no_model_is_one_line(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_model_class": "load_encoder_weights"}))
    with pytest.raises(ValueError, match="names _model_class 'load_encoder_weights', which is neither"):
        load_saved_model(str(folder))


@pytest.mark.parametrize("entry", [{"checkpoint_path": MISSING_FILE}, {"encoder_name": "tu-hf-hub:evil-org/net"}])
def test_an_smp_folder_naming_a_weight_source_is_refused(tmp_path, entry, offline):
    import segmentation_models_pytorch as smp

    folder = tmp_path / "smp"
    smp.Unet("tu-test_resnet", encoder_weights=None, encoder_depth=3, decoder_channels=[16, 8, 4],
             classes=2).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **entry}))
    with pytest.raises(UntrustedCodeError, match=rf"names {next(iter(entry))} .*trust_remote_code=True"):
        load_saved_model(str(folder))


def test_an_smp_folder_recording_imagenet_encoder_weights_loads_offline(tmp_path, offline):
    import segmentation_models_pytorch as smp

    folder = tmp_path / "smp"
    model = smp.Unet("tu-test_resnet", encoder_weights=None, encoder_depth=3, decoder_channels=[16, 8, 4],
                     classes=2).eval()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "encoder_weights": "imagenet"}))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(load_saved_model(str(folder)).eval()(x), model(x))
