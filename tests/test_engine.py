"""The training engine on tiny data: configs, instantiation, training, aux loss, checkpoints, resume, eval."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import convmoe
from convmoe.engine import Trainer, evaluate, instantiate, load_checkpoint, load_config, train
from convmoe.engine.callbacks import Callback
from convmoe.engine.config import apply_override, parse_value
from convmoe.models import UPerNetMoE

FIXTURES = Path(__file__).parent / "fixtures"


def segmentation_config(out: Path, **model: Any) -> dict[str, Any]:
    """UPerNet on the CamVid fixture: random 64x64 crops from the CSV, 4 per epoch, batch 2 (2 steps)."""
    return {
        "hyperparameters": {"classes": 11},
        "model": {"_target_": "convmoe.models.UPerNetMoE", "encoder_name": "tu-test_resnet", "encoder_weights": None,
                  "in_channels": 3, "classes": "${hyperparameters.classes}", "decoder_channels": 16,
                  "moe_num_experts": 4, **model},
        "loss": {"_target_": "torch.nn.CrossEntropyLoss", "ignore_index": 11},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
        "scheduler_list": [{"scheduler": {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 1e-3},
                            "interval": "step"}],
        "pl_trainer": {"max_epochs": 1, "precision": 32, "devices": 1, "default_root_dir": str(out),
                       "enable_progress_bar": False, "routing_stats_every_n_steps": 1},
        "data_loader": {"num_workers": 0},
        "train_dataset": {
            "_target_": "convmoe.data.RandomCropSegmentationDataset",
            "input_csv_path": str(FIXTURES / "camvid" / "train.csv"), "crop_size": [64, 64], "samples_per_epoch": 4,
            "augmentation_list": [{"_target_": "convmoe.data.transforms.HorizontalFlip", "p": 0.5},
                                  {"_target_": "convmoe.data.transforms.Normalize"},
                                  {"_target_": "convmoe.data.transforms.ToTensorV2"}],
            "data_loader": {"batch_size": 2, "shuffle": True, "drop_last": True}},
        "val_dataset": {
            "_target_": "convmoe.data.CamVidDataset", "root": str(FIXTURES / "camvid"), "split": "val",
            "augmentation_list": [{"_target_": "convmoe.data.transforms.CenterCrop", "height": 64, "width": 96},
                                  {"_target_": "convmoe.data.transforms.Normalize"}],
            "data_loader": {"batch_size": 2}},
    }


def classification_config(out: Path, **model: Any) -> dict[str, Any]:
    """A timm test_resnet on the CIFAR-10 batch fixtures: 20 train images, batch 10 (2 steps), 10 test images."""
    augment = [{"_target_": "convmoe.data.transforms.HorizontalFlip"},
               {"_target_": "convmoe.data.transforms.Normalize", "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}]
    root = str(FIXTURES / "cifar-10-batches-py")
    return {
        "model": {"_target_": "convmoe.models.create_classifier", "model_name": "test_resnet", "num_classes": 10,
                  **model},
        "loss": {"_target_": "torch.nn.CrossEntropyLoss", "label_smoothing": 0.1},
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9},
        "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 2},
        "trainer": {"max_epochs": 1, "default_root_dir": str(out), "enable_progress_bar": False},
        "data_loader": {"batch_size": 10, "num_workers": 0},
        "train_dataset": {"_target_": "convmoe.data.CIFAR10Dataset", "root": root, "split": "train",
                          "augmentation_list": augment},
        "val_dataset": {"_target_": "convmoe.data.CIFAR10Dataset", "root": root, "split": "test",
                        "augmentation_list": augment[1:]},
    }


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- configs ---------------------------------------------------------------------------------


def test_yaml_floats_references_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("defaults:\n  - _self_\nhp: {lr: 1e-4, epochs: 3}\noptimizer: {lr: '${hp.lr}'}\n"
                    "trainer: {max_epochs: '${hp.epochs}', name: 'run-${hp.epochs}'}\n")
    config = load_config(path, ["hp.epochs=5", "+trainer.seed=7", "~optimizer.lr"])
    assert config["hp"]["lr"] == 1e-4
    assert isinstance(config["hp"]["lr"], float)
    assert config["trainer"] == {"max_epochs": 5, "name": "run-5", "seed": 7}
    assert config["optimizer"] == {}
    assert "defaults" not in config


def test_override_errors_name_the_fix():
    config = {"trainer": {"max_epochs": 1}, "model": {"width": 2}, "items": [1, 2]}
    with pytest.raises(ValueError, match=r"write \+model.depth=1 to add it"):
        apply_override(config, "model.depth=1")
    with pytest.raises(ValueError, match=r"no key 'trainer\.sead' in the config \(did you mean 'trainer\.seed'\?\); "
                                         r"trainer settings: .*seed"):  # not a trainer setting: no '+' to suggest
        apply_override(config, "trainer.sead=1")
    # a trainer setting the recipe leaves at its default is added as is (trainer.resume=auto splits a run)
    apply_override(config, "trainer.resume=auto")
    apply_override(config, "trainer.seed=3")
    assert config["trainer"] == {"max_epochs": 1, "resume": "auto", "seed": 3}
    with pytest.raises(ValueError, match="must look like key=value"):
        apply_override(config, "trainer.max_epochs")
    apply_override(config, "items.1=5")
    assert config["items"] == [1, 5]
    assert parse_value("[0.5, 1e-3]") == [0.5, 0.001]


def test_reference_errors_and_config_groups():
    with pytest.raises(ValueError, match="cycle"):
        load_config({"a": "${b}", "b": "${a}"})
    with pytest.raises(ValueError, match="has no key 'missing'"):
        load_config({"a": "${missing.key}"})
    with pytest.raises(ValueError, match="config groups"):
        load_config({"defaults": ["_self_", {"model": "unet"}]})
    with pytest.raises(FileNotFoundError):
        load_config("no/such/config.yaml")


def test_instantiate_nested_lists_partial_and_args():
    node = {"_target_": "torch.nn.Sequential",
            "_args_": [{"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3},
                       {"_target_": "torch.nn.ReLU"}]}
    model = instantiate(node)
    assert isinstance(model[0], torch.nn.Linear)
    assert model[0].out_features == 3
    make = instantiate({"_target_": "torch.nn.Linear", "_partial_": True, "in_features": 4})
    assert make(out_features=2).weight.shape == (2, 4)
    assert instantiate({"a": [{"_target_": "builtins.int", "_args_": ["7"]}]}) == {"a": [7]}
    optimizer = instantiate({"_target_": "torch.optim.SGD", "lr": 0.1}, params=model.parameters())
    assert optimizer.param_groups[0]["lr"] == 0.1
    with pytest.raises(TypeError, match=r"building torch\.nn\.Linear"):
        instantiate({"_target_": "torch.nn.Linear", "in_features": 2, "out_feature": 3})
    with pytest.raises(ValueError, match=r"'torch\.optim' has no attribute 'Adamz'"):
        instantiate({"_target_": "torch.optim.Adamz"})


# ---- training --------------------------------------------------------------------------------


def test_segmentation_training_logs_routing_and_medoe_statistics(tmp_path):
    config = segmentation_config(tmp_path, _target_="convmoe.models.UPerNetMEDoE", moe_num_experts=8,
                                 medoe_drop_rate=0.25)
    result = train(config)
    assert result.monitor == "val/miou"
    assert result.best_checkpoint.is_file()
    assert result.last_checkpoint.is_file()
    [row] = read_rows(tmp_path / "metrics.csv")
    assert int(row["step"]) == 2
    for key in ("extra/train_medoe_expert_utilization", "extra/train_medoe_expert_entropy",
                "routing/train_utilization_entropy", "routing/train_dead_experts", "val/miou", "val/iou/sky"):
        assert row[key] != "", key
    assert 0 < float(row["extra/train_medoe_expert_utilization"]) <= 1
    total, task, aux = (float(row[k]) for k in ("train/loss", "train/task_loss", "train/aux_loss"))
    assert aux > 0
    assert total == pytest.approx(task + aux)
    # The switch loss lies in [1, E]; the engine adds it with the model's weight, 0.01.
    assert 0.01 <= aux <= 0.08
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["classes"] == 11
    # Training-time routing analysis: per-layer specialisation and balance, logged and saved per epoch.
    layer = "decoder.fusion_block.0"
    assert 0 <= float(row[f"routing/{layer}/specialization"]) <= 1
    assert 0 <= float(row[f"routing/{layer}/utilization_entropy"]) <= 1
    [epoch] = json.loads((tmp_path / "routing_history.json").read_text())
    assert epoch["epoch"] == 0
    assert epoch["layers"][layer]["dead_experts"] == float(row[f"routing/{layer}/dead_experts"])
    assert (tmp_path / "routing_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return
    assert any((tmp_path / "tensorboard").iterdir())


def test_routing_tracking_follows_classification_labels_and_can_be_turned_off(tmp_path):
    moe = {"moe_targets": "last", "moe_config": {"num_experts": 4, "top_k": 1}}
    config = classification_config(tmp_path / "on", **moe)
    config["trainer"]["routing_stats_every_n_steps"] = 1
    [row] = train(config).history
    [layer] = {key.split("/")[1] for key in row if key.startswith("routing/") and key.endswith("/specialization")}
    history = json.loads((tmp_path / "on" / "routing_history.json").read_text())
    assert history[0]["layers"][layer]["specialization"] == pytest.approx(row[f"routing/{layer}/specialization"])
    off = classification_config(tmp_path / "off", **moe)
    off["trainer"]["track_routing"] = False
    [row] = train(off).history
    assert not any(key.endswith("/specialization") for key in row)
    assert not (tmp_path / "off" / "routing_history.json").exists()
    assert "routing/train_utilization_entropy" in row  # the routing statistics stay


class _Recorder(Callback):
    """Counts the hooks the trainer calls, and adds one metric and one checkpoint key."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def setup(self, trainer):
        self.calls.append("setup")

    def on_train_batch_end(self, trainer, target, batch_index):
        self.calls.append(f"batch{batch_index}")

    def on_train_epoch_end(self, trainer, epoch):
        return {"extra/recorded": float(epoch + 1)}

    def on_save_checkpoint(self, trainer, checkpoint):
        checkpoint["recorder"] = list(self.calls)

    def on_epoch_saved(self, trainer, epoch):
        self.calls.append(f"saved{epoch}")


def test_callbacks_run_in_the_loop_and_the_routing_tracker_is_one_of_them(tmp_path):
    config = classification_config(tmp_path, moe_targets="last", moe_config={"num_experts": 4, "top_k": 1})
    recorder = _Recorder()
    trainer = Trainer(config, callbacks=[recorder])
    assert [type(c).__name__ for c in trainer.callbacks] == ["_Recorder", "RoutingTrackerCallback"]
    [row] = trainer.fit().history
    assert recorder.calls == ["setup", "batch0", "batch1", "saved0"]
    assert row["extra/recorded"] == 1.0
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["recorder"] == ["setup", "batch0", "batch1"]
    # trainer.routing_tracker names the class track_routing adds (the engine does not import analysis)
    config["trainer"]["default_root_dir"] = str(tmp_path / "other")  # the first run's folder holds a run
    config["trainer"]["routing_tracker"] = "test_engine._Recorder"
    assert [type(c).__name__ for c in Trainer(config).callbacks] == ["_Recorder"]
    config["trainer"]["routing_tracker"] = "torch.nn.ReLU"
    with pytest.raises(TypeError, match=r"not a convmoe\.engine\.callbacks\.Callback subclass"):
        Trainer(config)


@pytest.mark.parametrize(("aux_weight", "router_moves"), [(0.01, True), (0.0, False)])
def test_engine_adds_the_aux_loss_to_the_task_loss(tmp_path, aux_weight, router_moves):
    config = segmentation_config(tmp_path, moe_aux_loss_weight=aux_weight, moe_noise_std=0.0)
    config["optimizer"] = {"_target_": "torch.optim.SGD", "lr": 10.0}
    config.pop("scheduler_list")
    trainer = Trainer(config)
    trainer.loss_fn = lambda logits, target: logits.sum() * 0.0  # only the aux loss can move the router
    gate = trainer.model.decoder.fusion_block[0].router.gate.proj.weight
    before = gate.detach().clone()
    row = trainer.train_epoch(0)
    assert (row["train/aux_loss"] > 0) == router_moves
    assert (not torch.equal(gate.detach(), before)) == router_moves


def test_one_frequency_window_per_optimizer_step(tmp_path):
    """With gradient accumulation the global-batch switch loss counts over the step's micro-batches."""
    config = classification_config(tmp_path, moe_targets="last_stage",
                                   moe_config={"num_experts": 4, "top_k": 1, "losses": {"switch_global": 0.01}})
    config["trainer"]["accumulate_grad_batches"] = 2
    trainer = Trainer(config)
    seen = []
    for _, block in convmoe.moe_blocks(trainer.model):
        block.balancing.register_forward_hook(
            lambda module, args, out: seen.append((id(module), id(module.window), module.window.calls)))
    row = trainer.train_epoch(0)
    assert row["train/aux_loss"] > 0
    assert trainer.global_step == 1  # 2 batches, one optimizer step
    blocks = {block for block, _, _ in seen}
    for block in blocks:
        calls = [(window, count) for b, window, count in seen if b == block]
        assert len({window for window, _ in calls}) == 1  # the same window for both micro-batches
        assert [count for _, count in calls] == [1, 2]
    assert all(block.balancing.window is None for _, block in convmoe.moe_blocks(trainer.model))


def test_classification_training_two_steps_reports_top1_and_top5(tmp_path):
    result = train(classification_config(tmp_path))
    assert result.monitor == "val/top1"
    [row] = result.history
    assert row["step"] == 2
    assert 0 <= row["val/top1"] <= row["val/top5"] <= 100
    assert row["lr"] == pytest.approx(0.05)  # the rate used during the epoch
    state = load_checkpoint(result.last_checkpoint)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.025)  # cosine, T_max=2: halved


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    config = segmentation_config(tmp_path)
    config["scheduler_list"][0]["scheduler"]["total_steps"] = 4  # the two-epoch run that is interrupted after one
    first = train(config)
    assert [row["epoch"] for row in first.history] == [0]
    resumed_config = copy.deepcopy(config)
    resumed_config["pl_trainer"].update(max_epochs=2, resume="auto")
    trainer = Trainer(resumed_config)
    result = trainer.fit()
    assert trainer.start_epoch == 1
    assert [row["epoch"] for row in result.history] == [1]
    assert trainer.global_step == 4
    assert [int(r["epoch"]) for r in read_rows(tmp_path / "metrics.csv")] == [0, 1]
    history = json.loads((tmp_path / "routing_history.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]  # the curves go on across the resume
    state = load_checkpoint(result.last_checkpoint)
    assert state["epoch"] == 1
    assert state["global_step"] == 4
    assert all(int(s["step"]) == 4 for s in state["optimizer"]["state"].values())
    assert state["schedulers"][0]["last_epoch"] == 4


def test_best_checkpoint_is_the_best_epoch_and_eval_reproduces_it(tmp_path):
    config = segmentation_config(tmp_path)
    config["pl_trainer"]["max_epochs"] = 3
    result = train(config)
    rows = read_rows(tmp_path / "metrics.csv")
    best_row = max(rows, key=lambda r: float(r["val/miou"]))
    state = load_checkpoint(result.best_checkpoint)
    assert state["epoch"] == int(best_row["epoch"])
    assert result.best_metric == pytest.approx(float(best_row["val/miou"]))
    metrics = evaluate(result.best_checkpoint, progress=False)
    assert metrics["miou"] == pytest.approx(float(best_row["val/miou"]), abs=1e-6)
    assert metrics["loss"] == pytest.approx(float(best_row["val/loss"]), rel=1e-5)


def test_eval_of_a_save_pretrained_folder_with_a_config(tmp_path):
    config = segmentation_config(tmp_path / "run")
    model = UPerNetMoE(encoder_name="tu-test_resnet", encoder_weights=None, classes=11, decoder_channels=16)
    model.save_pretrained(tmp_path / "saved")
    metrics = evaluate(tmp_path / "saved", config=config, progress=False)
    assert 0 <= metrics["miou"] <= 1
    assert "iou/road" in metrics
    with pytest.raises(ValueError, match="no test_dataset"):
        evaluate(tmp_path / "saved", config=config, split="test", progress=False)


def test_missing_sections_and_unsupported_trainer_keys(tmp_path):
    config = segmentation_config(tmp_path)
    del config["optimizer"]
    with pytest.raises(ValueError, match="no 'optimizer' section"):
        Trainer(config)
    config = segmentation_config(tmp_path)
    config["pl_trainer"]["callbacks"] = []
    with pytest.warns(UserWarning, match=r"\['callbacks'\] are not supported"):
        Trainer(config)


def test_cli_train_and_eval(tmp_path, capsys):
    from convmoe.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(segmentation_config(tmp_path / "run")))
    assert main(["train", str(path), "pl_trainer.max_epochs=1", "+pl_trainer.limit_val_batches=1"]) == 0
    [row] = read_rows(tmp_path / "run" / "metrics.csv")
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert f"checkpoint: {best}" in capsys.readouterr().out
    assert main(["eval", str(best), "data_loader.num_workers=0", "--output", str(tmp_path / "metrics.json")]) == 0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["miou"] == pytest.approx(float(row["val/miou"]), abs=1e-6)
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_cli_eval_scores_at_most_max_batches(tmp_path, capsys, monkeypatch):
    import importlib

    from convmoe.cli import main

    evaluate_module = importlib.import_module("convmoe.engine.evaluate")  # the package exports a function of that name
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_config(tmp_path / "run")))
    assert main(["train", str(path)]) == 0
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    calls: list[int] = []
    load_model = evaluate_module.load_model

    def counting(*args, **kwargs):
        model, config = load_model(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
        return model, config

    monkeypatch.setattr(evaluate_module, "load_model", counting)
    capsys.readouterr()
    assert main(["eval", str(best), "--max-batches", "1", "data_loader.batch_size=2", "--no-progress"]) == 0
    assert calls == [2]
    err = capsys.readouterr().err
    assert "scored at most 1 batch(es) of the val split (--max-batches): not the split's figure" in err
    assert "eval val" not in err  # --no-progress: no bar
    calls.clear()
    assert main(["eval", str(best), "data_loader.batch_size=2"]) == 0
    assert calls == [2] * 5  # the whole split: 10 images
    assert "eval val" in capsys.readouterr().err  # the bar, by default
    assert main(["eval", str(best), "--max-batches", "0"]) == 2


def test_cli_describe_reads_a_training_checkpoint(tmp_path, capsys):
    from convmoe.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_config(tmp_path / "run", moe_targets="last",
                                                         moe_config={"num_experts": 4, "top_k": 1})))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["describe", str(tmp_path / "run" / "checkpoints" / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "layer4.0.conv2" in out
    assert "1 MoE block(s)" in out
    assert main(["describe", str(tmp_path / "run" / "checkpoints" / "best.pt"), "--revision", "main"]) == 2
    assert "--revision applies to Hub repos only" in capsys.readouterr().err
