"""Loading is data, never code: folders and checkpoints build only allow-listed callables.

Each payload would create a marker file if it ran; every test asserts that it did not, and that the
explicit opt-in (``trust_remote_code=True`` / ``register_factory``) works for a harmless builder.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import convmoe
from convmoe.engine.checkpoint import save_checkpoint
from convmoe.engine.evaluate import evaluate, load_model
from convmoe.hub import CONFIG_NAME, from_pretrained, save_pretrained
from convmoe.trust import UntrustedCodeError, check_config_targets, is_trusted_factory, register_factory

REPO = Path(__file__).resolve().parents[1]
HARMLESS = """
import timm


def build(num_classes=3):
    return timm.create_model("test_resnet", num_classes=num_classes)
"""
CLASSIFIER = {"_target_": "convmoe.models.create_classifier", "model_name": "test_resnet", "num_classes": 3}


@pytest.fixture
def harmless_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module with a model builder, importable for this test only."""
    name = f"convmoe_harmless_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HARMLESS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _folder_with_base(tmp_path: Path, base: dict) -> Path:
    """A genuine checkpoint folder whose config.json names ``base`` instead of its own recipe."""
    folder = save_pretrained(convmoe.create_model("timm:test_resnet", num_classes=3), tmp_path / "folder")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["base"] = base
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


def _payloads(marker: Path) -> list[dict]:
    return [
        {"library": "factory", "name": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}},
        {"library": "factory", "name": "os:system", "kwargs": {"command": f"touch {marker}"}},
        # Reaching os through an import of an allow-listed module must not work either.
        {"library": "factory", "name": "convmoe.models.classification:importlib.import_module",
         "kwargs": {"name": "antigravity"}},
        {"library": "factory", "name": "convmoe.models:_packaged_model", "kwargs": {"model_name": "x"}},
    ]


@pytest.mark.parametrize("index", range(4))
def test_a_config_json_naming_foreign_code_runs_nothing(tmp_path, index):
    marker = tmp_path / "pwned"
    base = _payloads(marker)[index]
    folder = _folder_with_base(tmp_path, base)
    with pytest.raises(UntrustedCodeError, match=rf"names the base factory '{base['name']}', which is not in convmoe's "
                                                 r"allow-list.*nothing was run.*trust_remote_code=True"):
        from_pretrained(folder)
    assert not marker.exists()
    assert "antigravity" not in sys.modules


def test_describe_and_eval_refuse_foreign_code_with_one_line(tmp_path, capsys):
    from convmoe.cli import main

    marker = tmp_path / "pwned"
    folder = _folder_with_base(tmp_path, _payloads(marker)[1])
    assert main(["describe", str(folder)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("convmoe describe: error:")
    assert "--trust-remote-code" in error
    assert "\n" not in error
    assert not marker.exists()


def test_the_opt_in_and_registration_allow_a_harmless_factory(tmp_path, harmless_module):
    base = {"library": "factory", "name": f"{harmless_module}:build", "kwargs": {"num_classes": 3}}
    model = convmoe.create_model(f"{harmless_module}:build", num_classes=3).eval()
    folder = save_pretrained(model, tmp_path / "ckpt")
    assert json.loads((folder / CONFIG_NAME).read_text())["base"] == base
    with pytest.raises(UntrustedCodeError):
        from_pretrained(folder)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(from_pretrained(folder, trust_remote_code=True)(x), model(x))
    module = sys.modules[harmless_module]
    assert register_factory(module.build) is module.build
    assert is_trusted_factory(f"{harmless_module}:build")
    assert torch.equal(from_pretrained(folder)(x), model(x))


def test_zoo_variants_load_without_any_opt_in():
    folders = sorted(p.parent for p in (REPO / "zoo").glob("*/config.json"))
    assert len(folders) >= 4
    for folder in folders:
        model = from_pretrained(folder)
        assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("config_file", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_the_repository_recipes_are_allow_listed(config_file):
    # A checkpoint trained from any shipped recipe evaluates from its own config without the opt-in.
    config = yaml.safe_load((REPO / config_file).read_text())
    check_config_targets(config, trust_remote_code=False, where=config_file)


def _checkpoint(tmp_path: Path, config: dict) -> Path:
    model = convmoe.models.create_classifier("test_resnet", num_classes=3)
    return save_checkpoint(tmp_path / "run" / "last.pt", {"config": config, "model": model.state_dict(), "epoch": 1})


def _checkpoint_payloads(marker: Path) -> dict[str, dict]:
    return {
        "os.system": {"model": {"_target_": "os.system", "_args_": [f"touch {marker}"]}},
        "create_model": {"model": {"_target_": "convmoe.create_model", "name": "os:system",
                                   "command": f"touch {marker}"}},
        "import through an allowed module": {"model": {"_target_": "convmoe.models.classification.importlib."
                                                                   "import_module", "name": "antigravity"}},
        "nested keyword": {"model": {**CLASSIFIER, "moe_config": {"_target_": "os.system",
                                                                  "_args_": [f"touch {marker}"]}}},
        "dataset": {"model": CLASSIFIER, "val_dataset": {"_target_": "os.system", "_args_": [f"touch {marker}"]}},
    }


@pytest.mark.parametrize("payload", ["os.system", "create_model", "import through an allowed module",
                                     "nested keyword", "dataset"])
def test_a_checkpoint_config_naming_foreign_code_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = _checkpoint(tmp_path, _checkpoint_payloads(marker)[payload])
    with pytest.raises(UntrustedCodeError, match=r"names _target_ .* not in convmoe's allow-list.*nothing was run"):
        evaluate(path, progress=False)
    assert not marker.exists()
    assert "antigravity" not in sys.modules


def test_the_users_own_config_is_used_instead_of_the_checkpoints(tmp_path):
    marker = tmp_path / "pwned"
    path = _checkpoint(tmp_path, _checkpoint_payloads(marker)["os.system"])
    model, _ = load_model(path, config={"model": CLASSIFIER})
    assert isinstance(model, torch.nn.Module)
    assert not marker.exists()


def test_a_checkpoint_with_a_harmless_foreign_target_needs_the_opt_in(tmp_path, harmless_module):
    path = _checkpoint(tmp_path, {"model": {"_target_": f"{harmless_module}.build", "num_classes": 3}})
    with pytest.raises(UntrustedCodeError, match=rf"'{harmless_module}\.build'"):
        load_model(path)
    model, _ = load_model(path, trust_remote_code=True)
    assert model.num_classes == 3


def test_a_checkpoint_with_weights_for_another_model_names_the_fix(tmp_path):
    path = _checkpoint(tmp_path, {"model": {**CLASSIFIER, "num_classes": 5}})
    with pytest.raises(ValueError, match=r"do not match config: shape mismatch 'fc\.weight'.*pass the config it was "
                                         r"trained with"):
        load_model(path)
