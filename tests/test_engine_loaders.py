"""Evaluation loaders: every sample, once, in order, whatever the node's training settings say."""

from __future__ import annotations

import torch

from convmoe.engine.loaders import build_dataloader
from convmoe.engine.processes import DistributedContext

CPU = DistributedContext(0, 0, 1, torch.device("cpu"))


def test_an_evaluation_loader_keeps_the_last_partial_batch_and_the_order() -> None:
    # `convmoe eval --split train` reads train_dataset, whose loader drops the last partial batch and shuffles
    node = {"_target_": "builtins.list", "_args_": [list(range(7))],
            "data_loader": {"batch_size": 3, "drop_last": True, "shuffle": True}}
    seen = [value for batch in build_dataloader(node, {}, CPU, train=False) for value in batch.tolist()]
    assert seen == list(range(7))


def test_top_level_drop_last_does_not_drop_evaluation_samples() -> None:
    node = {"_target_": "builtins.list", "_args_": [list(range(5))]}
    batches = list(build_dataloader(node, {"batch_size": 2, "drop_last": True}, CPU, train=False))
    assert [batch.tolist() for batch in batches] == [[0, 1], [2, 3], [4]]


def test_a_training_loader_keeps_its_drop_last_and_shuffle() -> None:
    node = {"_target_": "builtins.list", "_args_": [list(range(7))],
            "data_loader": {"batch_size": 3, "drop_last": True, "shuffle": True}}
    batches = list(build_dataloader(node, {}, CPU, train=True))
    order = [value for batch in batches for value in batch.tolist()]
    assert [len(batch) for batch in batches] == [3, 3]  # the 7th sample is dropped
    assert len(set(order)) == 6
    assert order != sorted(order)  # shuffled (the order is a function of the seed: fixed here)
