"""Loaders: evaluation reads every sample, once, in order, whatever the node's training settings say;
the loops read each loader once per pass, progress bar or not."""

from __future__ import annotations

import warnings

import pytest
import torch
from iteration_helpers import CountingIterable
from test_engine import classification_config, segmentation_config
from torch.utils.data import DataLoader

from convmoe.engine import Trainer
from convmoe.engine.evaluate import run_evaluation
from convmoe.engine.loaders import build_dataloader
from convmoe.engine.processes import DistributedContext

CPU = DistributedContext(0, 0, 1, torch.device("cpu"))


@pytest.fixture
def loader_passes(monkeypatch) -> list[DataLoader]:
    """Every DataLoader pass started during the test, in order."""
    passes: list[DataLoader] = []
    original = DataLoader.__iter__

    def counting(self: DataLoader):
        passes.append(self)
        return original(self)

    monkeypatch.setattr(DataLoader, "__iter__", counting)
    return passes


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


@pytest.mark.parametrize("progress", [True, False])
def test_each_epoch_reads_the_training_and_validation_loaders_once(tmp_path, loader_passes, progress: bool) -> None:
    # tqdm.auto's bar iterated the loader twice: workers started twice, and the order and worker seeds were
    # the generator's second draw, so `convmoe eval --split train` saw the very views of training epoch 0
    config = classification_config(tmp_path)
    config["trainer"].update(max_epochs=2, enable_progress_bar=progress)
    trainer = Trainer(config)
    trainer.fit()
    assert loader_passes == [trainer.train_loader, trainer.val_loader] * 2


@pytest.mark.parametrize("progress", [True, False])
def test_evaluation_reads_its_loader_once(progress: bool) -> None:
    batches = CountingIterable([(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])) for _ in range(3)])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    run_evaluation(model, batches, torch.device("cpu"), progress=progress)
    assert batches.iterations == 1


class RandomDraws(torch.utils.data.Dataset):
    """Item i is a random number: a random transform's draw."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(())


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_evaluation_loader_draws_the_same_views_every_pass_and_not_the_training_ones(num_workers: int) -> None:
    node = {"_target_": "test_engine_loaders.RandomDraws", "data_loader": {"batch_size": 3, "num_workers": num_workers}}
    evaluation = build_dataloader(node, {}, CPU, train=False, seed=5)
    torch.manual_seed(0)
    first = torch.cat(list(evaluation))
    torch.manual_seed(1)  # the global stream does not matter: the loader's seed does
    assert torch.equal(torch.cat(list(evaluation)), first)
    assert torch.equal(torch.cat(list(build_dataloader(node, {}, CPU, train=False, seed=5))), first)
    assert not torch.equal(torch.cat(list(build_dataloader(node, {}, CPU, train=False, seed=6))), first)
    training = build_dataloader({**node, "data_loader": {**node["data_loader"], "shuffle": False}}, {}, CPU,
                                train=True, seed=5)
    assert not torch.equal(torch.cat(list(training)), first)  # epoch 0 of training drew other views


def test_an_evaluation_pass_leaves_the_global_random_stream_alone() -> None:
    node = {"_target_": "test_engine_loaders.RandomDraws", "data_loader": {"batch_size": 3}}
    evaluation = build_dataloader(node, {}, CPU, train=False)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(evaluation)
    assert torch.equal(torch.rand(3), expected)  # validating does not change what training draws next


def test_building_a_trainer_reads_no_validation_batch(tmp_path, loader_passes) -> None:
    # the default monitor needs the task: one validation sample tells it, without starting the loader's workers
    assert Trainer(classification_config(tmp_path / "classification")).monitor == "val/top1"
    assert Trainer(segmentation_config(tmp_path / "segmentation")).monitor == "val/miou"
    streamed = classification_config(tmp_path / "streamed")
    streamed["val_dataset"] = {"_target_": "test_engine_loaders.StreamedSamples", "target_shape": []}
    assert Trainer(streamed).monitor == "val/top1"
    streamed["val_dataset"]["target_shape"] = [8, 8]
    assert Trainer(streamed).monitor == "val/miou"
    assert loader_passes == []


class StreamedSamples(torch.utils.data.IterableDataset):
    """Two samples, streamed: class ids (``target_shape=[]``) or masks."""

    def __init__(self, target_shape: list[int]) -> None:
        self.target_shape = target_shape

    def __iter__(self):
        return iter([{"image": torch.zeros(3, 8, 8), "target": torch.zeros(self.target_shape, dtype=torch.long)}] * 2)


@pytest.mark.parametrize("train", [True, False])
def test_a_gpu_recipe_with_workers_loads_on_a_cpu_without_workers(train: bool) -> None:
    # The shipped recipes pin memory and keep 8 persistent workers: on a CPU, with num_workers=0 overridden,
    # torch would warn at every loader and refuse persistent_workers and prefetch_factor.
    node = {"_target_": "builtins.list", "_args_": [list(range(4))]}
    settings = {"batch_size": 2, "num_workers": 0, "pin_memory": True, "persistent_workers": True,
                "prefetch_factor": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = build_dataloader(node, settings, CPU, train=train)
        batches = list(loader)
    assert not loader.pin_memory
    assert sorted(value for batch in batches for value in batch.tolist()) == [0, 1, 2, 3]
