"""The engine's ``init_from``: a run starts from every weight of a trained model (a ``convmoe train`` checkpoint, a
``save_pretrained`` folder), and with a ``patch`` section its experts start as copies of the trained convs (sparse
upcycling); checkpoints of such a run load without the source."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_freeze import engine_config

import convmoe
from convmoe.block import named_blocks
from convmoe.engine import Trainer, load_model
from convmoe.engine.config_check import check_training_config
from convmoe.engine.model_build import build_model
from convmoe.zoo.weights import base_recipe_for

PATCH = {"targets": "last_stage", "config": {"num_experts": 4, "top_k": 2, "tokens": "image"}}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> tuple[dict, Path]:
    """A dense test_resnet trained one step: its config and checkpoint."""
    out = tmp_path_factory.mktemp("dense")
    config = engine_config(out, None, moe=False)
    Trainer(copy.deepcopy(config)).fit()
    return config, out / "checkpoints" / "last.pt"


def _trained_dense(dense_run) -> torch.nn.Module:
    return load_model(dense_run[1])[0]


def _state_equal(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    state = reference.state_dict()
    return all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


def test_init_from_a_checkpoint_loads_every_weight(dense_run):
    config, checkpoint = dense_run
    torch.manual_seed(123)  # another random start than the run's: the weights must come from the checkpoint
    model = build_model({**config, "init_from": str(checkpoint)})
    assert _state_equal(model, _trained_dense(dense_run))


def test_init_from_with_a_patch_upcycles_the_trained_convs(dense_run):
    config, checkpoint = dense_run
    dense = _trained_dense(dense_run).eval()
    moe = build_model({**config, "init_from": str(checkpoint), "patch": PATCH}).eval()
    blocks = named_blocks(moe)
    assert blocks
    dense_modules = dict(dense.named_modules())
    for name, block in blocks.items():
        weight = dense_modules[name].weight
        assert all(torch.equal(expert, weight) for expert in block.experts.weight), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-4, atol=1e-5)


def test_init_from_a_save_pretrained_folder(dense_run, tmp_path):
    dense = _trained_dense(dense_run)
    folder = convmoe.save_pretrained(dense, tmp_path / "saved", base=base_recipe_for(dense_run[0]["model"]))
    model = build_model({**dense_run[0], "init_from": str(folder)})
    assert _state_equal(model, dense)


def test_init_from_switches_the_model_s_own_downloads_off(dense_run, monkeypatch):
    config, checkpoint = dense_run
    calls = []
    monkeypatch.setattr("convmoe.models.load_encoder_weights", lambda *args: calls.append(args))
    model = build_model({**config, "model": {**config["model"], "pretrained": True}, "init_from": str(checkpoint),
                         "init_encoder_from": {"_target_": "timm.create_model", "model_name": "test_resnet"}})
    assert calls == []  # init_from brings every weight: the encoder loader is not run
    assert _state_equal(model, _trained_dense(dense_run))


def test_weights_that_do_not_fit_are_a_one_line_error(dense_run):
    config, checkpoint = dense_run
    other = {**config, "model": {**config["model"], "num_classes": 3}, "init_from": str(checkpoint)}
    with pytest.raises(ValueError, match=r"init_from=.*last\.pt do not match.*'fc\.weight'.*before its patch section") \
            as error:
        build_model(other)
    assert "\n" not in str(error.value)


def test_a_missing_source_is_named(dense_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^init_from: checkpoint .*missing\.pt does not exist"):
        build_model({**dense_run[0], "init_from": str(tmp_path / "missing.pt")})


@pytest.mark.parametrize("value", [3, "", ["best.pt"]])
def test_a_bad_init_from_value_is_checked_before_anything_is_built(value):
    with pytest.raises(ValueError, match=r"init_from=.* must be a checkpoint file, a save_pretrained folder or a Hub id"):
        check_training_config({"model": {"_target_": "torch.nn.Identity"}, "init_from": value})


def test_a_run_started_from_init_from_resumes_and_evaluates_without_the_source(dense_run, tmp_path):
    checkpoint = dense_run[1]
    source = tmp_path / "source.pt"
    source.write_bytes(checkpoint.read_bytes())
    run = {**engine_config(tmp_path / "moe", None, moe=False), "init_from": str(source), "patch": PATCH}
    first = Trainer(copy.deepcopy(run))
    assert torch.equal(first.model.fc.weight, _trained_dense(dense_run).fc.weight)  # started from the source
    first.fit()
    source.unlink()  # the run's checkpoints hold every weight: resuming and loading need the source no more
    run["trainer"] |= {"max_epochs": 2, "resume": "auto"}
    trainer = Trainer(copy.deepcopy(run))
    trainer.fit()
    assert trainer.start_epoch == 1  # resumed after epoch 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = trainer.model.eval()(x)
    loaded, saved_config = load_model(tmp_path / "moe" / "checkpoints" / "last.pt")
    assert saved_config["init_from"] == str(source)
    assert set(named_blocks(loaded)) == set(named_blocks(trainer.model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)


def test_a_trainer_built_to_resume_refuses_to_train_once_its_checkpoint_is_gone(dense_run, tmp_path):
    """A Trainer built to resume has the architecture's fresh weights only: without the checkpoint it must not train."""
    checkpoint = dense_run[1]
    run = {**engine_config(tmp_path / "run", None, moe=False), "init_from": str(checkpoint)}
    Trainer(copy.deepcopy(run)).fit()
    run["trainer"] |= {"max_epochs": 2, "resume": "auto"}
    trainer = Trainer(copy.deepcopy(run))
    (tmp_path / "run" / "checkpoints" / "last.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"was built to resume from .*last\.pt, which no longer exists; .*"):
        trainer.fit()
