"""The zoo recipes in configs/ and configs/cpu/: they load, every _target_ resolves, and their datasets
and models build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from convmoe import moe_blocks
from convmoe.engine import instantiate, load_config, locate
from convmoe.engine.model_build import build_model

ROOT = Path(__file__).parents[1]
CONFIGS = [path for path in sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "cpu").glob("*.yaml"))
           if not path.is_symlink()]  # a local alias of a renamed recipe (never committed) is not a recipe
FIXTURES = Path(__file__).parent / "fixtures"
DATA_ROOTS = {"cifar10": FIXTURES / "cifar10_folder", "camvid": FIXTURES / "camvid"}


def targets(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [t for value in node.values() for t in targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in targets(value)]
    return []


def test_the_zoo_recipes_are_there():
    names = {path.stem for path in CONFIGS}
    recipes = {"cifar10_efficientnet_lite0_dense", "cifar10_efficientnet_lite0_moe", "camvid_upernet_dense",
               "camvid_upernet_moe", "camvid_upernet_moe_expert_choice", "camvid_upernet_medoe",
               "cifar10_efficientnet_lite0_lowrank", "cifar10_efficientnet_lite0_pointwise_moe", "camvid_upernet_lowrank",
               "cifar10_efficientnet_lite0_equal_cost_dense", "cifar10_efficientnet_lite0_equal_cost_moe",
               "camvid_upernet_equal_cost_dense", "camvid_upernet_equal_cost_moe", "camvid_upernet_equal_cost_encoder_moe"}
    assert recipes <= names
    assert {path.stem for path in CONFIGS if path.parent.name == "cpu"} == recipes  # a CPU budget of each


def test_cpu_recipes_change_only_the_budget():
    """A CPU recipe is its full recipe with a smaller budget: same model (but the decoder's width), loss,
    optimizer, schedule shape, frozen modules and seed."""
    for cpu in (path for path in CONFIGS if path.parent.name == "cpu"):
        small, full = load_config(cpu), load_config(ROOT / "configs" / cpu.name)
        model = dict(small["model"])
        if "decoder_channels" in full["model"]:
            assert model["decoder_channels"] < full["model"]["decoder_channels"]
            model["decoder_channels"] = full["model"]["decoder_channels"]
        assert model == full["model"], cpu.name
        for key in ("loss", "optimizer", "scheduler_list", "init_encoder_from", "freeze", "patch"):
            assert small.get(key) == full.get(key), (cpu.name, key)
        assert small["trainer"]["seed"] == full["trainer"]["seed"]
        assert small["trainer"]["default_root_dir"] == f"runs/cpu_{cpu.stem}"


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_recipe_builds_on_tiny_data(path):
    dataset_name = path.stem.split("_")[0]
    overrides = [f"data.root={DATA_ROOTS[dataset_name]}"]
    if dataset_name == "camvid":
        overrides.append("model.decoder_channels=32")  # the recipe's 256 only costs time here
    if "hold_out" in load_config(path)["data"]:
        overrides.append("data.hold_out=0.5")  # the recipe's 5,000 validation images are more than the fixture has
    config = load_config(path, overrides)
    for target in targets(config):
        locate(target)
    cpu = path.parent.name == "cpu"
    assert config["trainer"]["default_root_dir"] == f"runs/{'cpu_' if cpu else ''}{path.stem}"
    train_node = {k: v for k, v in config["train_dataset"].items() if k != "data_loader"}
    if dataset_name == "camvid" and not cpu:  # the fixture is 90x120: crop what it has
        train_node["augmentation_list"][1].update(height=64, width=96)
    sample = instantiate(train_node)[0]
    model = build_model(config).eval()  # the model section, init_encoder_from, the patch section
    with torch.no_grad():
        logits = model(sample["image"][None])
    size = ((64, 96) if not cpu else (160, 224)) if dataset_name == "camvid" else (config["data"]["image_size"],) * 2
    assert sample["image"].shape == (3, *size)
    assert logits.shape == ((1, 11, *size) if dataset_name == "camvid" else (1, 10))
    for split in ("val_dataset", "test_dataset"):  # evaluation pads the half-resolution frame to 192x256
        if cpu and dataset_name == "camvid":
            node = {k: v for k, v in config[split].items() if k != "data_loader"}
            assert node["split"] == split.split("_")[0]
            node["split"] = "val"  # the fixture has no test split
            item = instantiate(node)[0]
            assert item["image"].shape == (3, 192, 256)
            assert int((item["mask"] == 11).all(dim=1).sum()) >= 192 - 180  # the padded rows are ignored
    blocks = dict(moe_blocks(model))
    assert bool(blocks) == (not path.stem.endswith("_dense"))  # every recipe but the dense twins patches
