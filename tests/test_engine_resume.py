"""Resuming continues the same run: killed anywhere (mid-epoch, inside a checkpoint write) and resumed,
a run ends bit-identical to the uninterrupted one; resuming with the wrong config, and junk checkpoint
files, fail with one-line errors that name the fix."""

from __future__ import annotations

import copy
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from resume_helpers import BATCH_SIZE, MAX_EPOCHS, TRAIN_IMAGES, tiny_run_config

from convmoe.engine import Trainer, load_checkpoint, save_checkpoint, train

TESTS = Path(__file__).parent
READS_PER_EPOCH = TRAIN_IMAGES // BATCH_SIZE * BATCH_SIZE


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    # One thread everywhere: CPU kernels then add in one order, in every process.
    paths = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, expect_kill: bool = False) -> None:
    output, _ = process.communicate(timeout=300)
    expected = -signal.SIGKILL if expect_kill else 0
    assert process.returncode == expected, output[-3000:]


def write_config(run: Path, **pausing) -> Path:
    run.mkdir(parents=True)
    path = run / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(run / "out", **pausing)))
    return path


def train_command(config: Path, *overrides: str) -> list[str]:
    return ["-m", "convmoe.engine", str(config), *overrides]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run / "out" / "checkpoints" / "last.pt")
    assert state["epoch"] == MAX_EPOCHS - 1
    return state["model"]


def assert_bit_identical(resumed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == reference.keys()
    differences = {k: (resumed[k].double() - reference[k].double()).abs().max().item()
                   for k in reference if not torch.equal(resumed[k], reference[k])}
    worst = sorted(differences.items(), key=lambda item: -item[1])[:3]
    assert not differences, f"{len(differences)} tensors differ from the uninterrupted run; largest: {worst}"


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> dict[str, Path]:
    """Three runs of one config, side by side: uninterrupted; SIGKILLed mid-epoch 2 (after the epoch-1
    checkpoint); SIGKILLed inside its third checkpoint write (epoch 1's last.pt). The killed ones are resumed."""
    root = tmp_path_factory.mktemp("resume")
    launched: list[subprocess.Popen] = []
    try:
        yield from _kill_and_resume(root, launched)
    finally:  # a failed step leaves no process behind (the paused one would sleep for minutes)
        for process in launched:
            if process.poll() is None:
                process.kill()
                process.communicate()


def _kill_and_resume(root: Path, launched: list[subprocess.Popen]):
    def start(args: list[str]) -> subprocess.Popen:
        launched.append(launch(args, root))
        return launched[-1]

    reference = start(train_command(write_config(root / "reference")))
    marker = root / "paused"
    pause_at = 2 * READS_PER_EPOCH + 2 * BATCH_SIZE + 1  # epoch 2, third batch
    mid_epoch = start(train_command(write_config(root / "mid_epoch", pause_at=pause_at, marker=marker)))
    in_save = start([str(TESTS / "resume_helpers.py"), "kill-on-save", "3", str(write_config(root / "in_save"))])
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert mid_epoch.poll() is None, mid_epoch.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never reached the pause"
        time.sleep(0.05)
    assert load_checkpoint(root / "mid_epoch" / "out" / "checkpoints" / "last.pt")["epoch"] == 1
    mid_epoch.send_signal(signal.SIGKILL)
    finish(mid_epoch, expect_kill=True)
    finish(in_save, expect_kill=True)
    checkpoints = root / "in_save" / "out" / "checkpoints"
    assert list(checkpoints.glob(".last.pt.*.tmp")), "the kill inside the write left no temporary"
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 0  # the previous good checkpoint
    # The resumed runs read one epoch's items, fewer than pause_at: they do not pause again.
    resumed = [start(train_command(root / run / "run.yaml", "trainer.resume=auto")) for run in ("mid_epoch", "in_save")]
    for process in [reference, *resumed]:
        finish(process)
    yield {run: root / run for run in ("reference", "mid_epoch", "in_save")}


def test_run_killed_mid_epoch_resumes_bit_identically(killed_and_resumed):
    assert_bit_identical(final_weights(killed_and_resumed["mid_epoch"]), final_weights(killed_and_resumed["reference"]))


def test_run_killed_inside_a_checkpoint_write_resumes_bit_identically_without_temporaries(killed_and_resumed):
    run = killed_and_resumed["in_save"]
    assert_bit_identical(final_weights(run), final_weights(killed_and_resumed["reference"]))
    assert not list((run / "out" / "checkpoints").glob("*.tmp"))


# ---- RNG states in checkpoints -----------------------------------------------------------------


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from convmoe.engine.checkpoint import capture_rng_state, restore_rng_state

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    random.gauss(0, 1)  # python's random keeps a cached gaussian in its state
    path = save_checkpoint(tmp_path / "last.pt", {"rng": [capture_rng_state()]})
    expected = (torch.rand(3), np.random.rand(3), random.gauss(0, 1), random.random())
    state = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng_state(state["rng"][0])
    again = (torch.rand(3), np.random.rand(3), random.gauss(0, 1), random.random())
    assert torch.equal(again[0], expected[0])
    assert np.array_equal(again[1], expected[1])
    assert again[2:] == expected[2:]


def test_loader_order_depends_on_the_epoch_not_on_the_history(tmp_path):
    trainer = Trainer(tiny_run_config(tmp_path))
    orders = {}
    for epoch in (0, 1, 2, 1):
        trainer.set_loader_epoch(epoch)
        order = list(iter(trainer.train_loader.sampler))
        assert orders.setdefault(epoch, order) == order
    assert orders[0] != orders[1] != orders[2]


def test_old_checkpoint_without_rng_states_resumes_with_a_warning(tmp_path):
    config = tiny_run_config(tmp_path)
    config["trainer"]["max_epochs"] = 1
    config["scheduler_list"][0]["scheduler"]["total_steps"] = 10  # room for a second epoch
    result = train(config)
    state = load_checkpoint(result.last_checkpoint)
    for key in ("rng", "loader"):
        state.pop(key, None)
    save_checkpoint(result.last_checkpoint, state)
    config["trainer"].update(max_epochs=2, resume="auto")
    with pytest.warns(UserWarning, match="no RNG states.*not exact"):
        Trainer(config).fit()


# ---- resuming with another config ----------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path) -> dict:
    """A finished one-epoch run of the tiny config; returns the config to resume it with."""
    config = tiny_run_config(tmp_path)
    config["trainer"]["max_epochs"] = 1
    train(config)
    config["trainer"]["resume"] = "auto"
    return config


def test_resume_with_more_epochs_than_the_one_cycle_schedule_fails_before_training(finished_run, tmp_path):
    config = copy.deepcopy(finished_run)
    config["trainer"]["max_epochs"] = 3
    trainer = Trainer(config)
    with pytest.raises(ValueError, match=r"total_steps=5.*max_epochs=1.*start a new run") as error:
        trainer.fit()
    assert "\n" not in str(error.value)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 0  # nothing was trained


def test_a_fixed_schedule_too_short_for_a_fresh_run_fails_at_construction(tmp_path):
    config = tiny_run_config(tmp_path)
    config["scheduler_list"][0]["scheduler"]["total_steps"] = 10
    with pytest.raises(ValueError, match=r"total_steps=10.*15 steps"):
        Trainer(config)


def test_resume_with_a_changed_model_names_the_tensors(finished_run):
    config = copy.deepcopy(finished_run)
    config["model"]["moe_config"]["num_experts"] = 2
    with pytest.raises(ValueError, match=r"does not match the model.*router.*model.moe_config.num_experts.*"
                                         r"resume with the config") as error:
        Trainer(config).fit()
    assert "\n" not in str(error.value)


def test_resume_with_a_changed_optimizer_names_it(finished_run):
    config = copy.deepcopy(finished_run)
    config["optimizer"] = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}
    with pytest.raises(ValueError, match=r"torch\.optim\.AdamW.*torch\.optim\.SGD.*resume with the config") as error:
        Trainer(config).fit()
    assert "\n" not in str(error.value)


# ---- checkpoint files ------------------------------------------------------------------------------


def _real_checkpoint_bytes(tmp_path: Path) -> bytes:
    path = save_checkpoint(tmp_path / "real.pt", {"model": {"weight": torch.randn(64, 64)}, "epoch": 0})
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["random", "truncated", "text", "empty", "pickled_object"])
def test_load_checkpoint_reports_a_junk_file_in_one_line(tmp_path, kind):
    path = tmp_path / "last.pt"
    if kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "truncated":
        data = _real_checkpoint_bytes(tmp_path)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("epoch: 3\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        with open(path, "wb") as f:
            pickle.dump({"version": 1, "ratio": Fraction(1, 3)}, f, protocol=2)  # torch.load's own protocol
    with pytest.raises(ValueError, match=r"last\.pt") as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message
    assert "cannot be read as a checkpoint" in message
    assert ("weights_only" in message) == (kind == "pickled_object")


def test_save_checkpoint_removes_stale_temporaries_of_that_name(tmp_path):
    for name in ("last.pt.tmp", "last.pt.k3j2_x.tmp", ".last.pt.q9w8.tmp", "best.pt.a1b2.tmp"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "last.pt", {"epoch": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt.a1b2.tmp", "last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4


def test_unwrap_model_takes_off_wrappers_only() -> None:
    """A model whose own submodule is called ``module`` is not a wrapper: its checkpoint keeps every key."""
    from torch import nn

    from convmoe.analysis import redundancy
    from convmoe.engine.checkpoint import unwrap_model

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 1)

    holder = Holder()
    assert unwrap_model(holder) is holder
    assert unwrap_model(nn.DataParallel(holder)) is holder
    compiled = type("Compiled", (nn.Module,), {})()
    compiled._orig_mod = holder
    assert unwrap_model(compiled) is holder
    assert redundancy.unwrap_model is unwrap_model  # one definition
