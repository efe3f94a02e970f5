"""The zoo recipes in configs/: they load, every _target_ resolves, and their datasets and models build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from convmoe import moe_blocks
from convmoe.engine import instantiate, load_config, locate
from convmoe.models import load_encoder_weights

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
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
    assert {"cifar10_efficientnet_lite0_dense", "cifar10_efficientnet_lite0_moe", "camvid_upernet_dense",
            "camvid_upernet_moe", "camvid_upernet_moe_expert_choice", "camvid_upernet_medoe"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_builds_on_tiny_data(path):
    dataset_name = path.stem.split("_")[0]
    overrides = [f"data.root={DATA_ROOTS[dataset_name]}"]
    if dataset_name == "camvid":
        overrides.append("model.decoder_channels=32")  # the recipe's 256 only costs time here
    config = load_config(path, overrides)
    for target in targets(config):
        locate(target)
    assert config["trainer"]["default_root_dir"] == f"runs/{path.stem}"
    train_node = {k: v for k, v in config["train_dataset"].items() if k != "data_loader"}
    if dataset_name == "camvid":  # the fixture is 90x120: crop what it has
        train_node["augmentation_list"][1].update(height=64, width=96)
    sample = instantiate(train_node)[0]
    model = instantiate(config["model"]).eval()
    if "init_encoder_from" in config:
        load_encoder_weights(model, instantiate(config["init_encoder_from"]))
    with torch.no_grad():
        logits = model(sample["image"][None])
    if dataset_name == "camvid":
        assert sample["image"].shape == (3, 64, 96)
        assert logits.shape == (1, 11, 64, 96)
    else:
        assert sample["image"].shape == (3, 128, 128)
        assert logits.shape == (1, 10)
    blocks = dict(moe_blocks(model))
    assert bool(blocks) == ("moe" in path.stem or "medoe" in path.stem)
