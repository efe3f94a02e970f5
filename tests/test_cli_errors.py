"""Every bad input of the ``convmoe`` command line ends in one line on stderr,
``convmoe <command>: error: <problem and fix>``, with exit status 2 and no traceback; ``--debug``
shows the traceback instead.

Most cases run in-process through ``convmoe.cli.main``; a few through a real subprocess. Cases
marked "(others' fix)" pass the one-line contract through ``main``'s catch-all today, and check the
message itself once the file that raises it names the problem.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_engine import classification_config

from convmoe.cli import main

UNEXPECTED = "unexpected error"  # the catch-all's wording: a message that no convmoe code wrote


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The single stderr line of a failed command, checked for the contract."""
    return check_one_line(capsys.readouterr().err, command)


def check_one_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"convmoe {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], command: str | None = None) -> str:
    """Run ``convmoe ARGV`` in-process; it must exit 2 with one error line, which is returned."""
    assert main(argv) == 2
    return one_error_line(capsys, command or argv[0])


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """A valid training config (timm test_resnet on the CIFAR-10 fixture)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_config(tmp_path / "run"), sort_keys=False))
    return path


@pytest.fixture
def junk_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"junk" * 100)
    return path


@pytest.fixture
def truncated_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "full.pt"
    torch.save({"version": 1, "model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    return truncated


# -- YAML files ----------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {_target_: torch.nn.Linear\ntrainer: [1,\n")
    line = fails(["train", str(path)], capsys)
    assert str(path) in line
    assert "not valid YAML" in line
    assert "line " in line


def test_yaml_top_level_that_is_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    line = fails(["train", str(path)], capsys)
    assert "must be a YAML mapping at the top level (key: value lines), got list" in line


def test_eval_config_with_a_yaml_syntax_error(tmp_path, junk_checkpoint, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("val_dataset: [\n")
    line = fails(["eval", str(junk_checkpoint), "--config", str(path)], capsys)
    assert str(path) in line
    assert "not valid YAML" in line


def test_override_value_that_is_not_yaml(recipe, capsys):
    line = fails(["train", str(recipe), "trainer.max_epochs=[1"], capsys)
    assert "'trainer.max_epochs=[1'" in line
    assert "not a valid YAML value" in line


# -- config values of the wrong type -------------------------------------------------------------------


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.max_epochs=abc", r"trainer.max_epochs='abc' must be an int, got str"),
    ("trainer.enable_progress_bar=maybe", r"trainer.enable_progress_bar='maybe' must be a bool"),
    ("+trainer.gradient_clip_val=[1]", r"trainer.gradient_clip_val=[1] must be a float or null, got list"),
    ("data_loader.batch_size=[1]", r"data_loader.batch_size=[1] must be an int or null, got list"),
    ("+data_loader.batchsize=4", r"data_loader has no setting 'batchsize'"),
    ("+train_dataset.data_loader.batch_size=two", r"train_dataset.data_loader.batch_size='two' must be an int"),
    ("trainer=5", r"trainer=5 must be a mapping of settings, got int"),
    ("data_loader=3", r"data_loader=3 must be a mapping of settings, got int"),
    ("model=3", r"model=3 must be a mapping with a _target_, got int"),
    ("optimizer={lr: 0.1}", r"optimizer has no _target_"),
    ("val_dataset=3", r"val_dataset=3 must be a mapping with a _target_ (or a list of them), got int"),
    ("scheduler=[1]", r"scheduler=[1] must be a mapping with a _target_"),
])
def test_config_value_of_the_wrong_type(recipe, capsys, override, expected):
    line = fails(["train", str(recipe), override], capsys)
    assert expected in line
    assert UNEXPECTED not in line


def test_a_misspelt_target_argument_names_the_target(recipe, capsys):
    line = fails(["train", str(recipe), "+optimizer.lrr=0.1"], capsys)
    assert "building torch.optim.SGD: " in line
    assert "unexpected keyword argument 'lrr'; fix the keys of that _target_ in the config." in line
    assert UNEXPECTED not in line


def test_eval_config_value_of_the_wrong_type(recipe, junk_checkpoint, capsys):
    line = fails(["eval", str(junk_checkpoint), "data_loader.batch_size=[1]", "--config", str(recipe)], capsys)
    assert "data_loader.batch_size=[1] must be an int or null" in line


def test_analyze_config_whose_dataset_is_not_a_mapping(tmp_path, recipe, capsys):
    config = yaml.safe_load(recipe.read_text())
    config["val_dataset"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    line = fails(["analyze", "no/such/model.pt", str(path), "--out", str(tmp_path / "a")], capsys)
    assert "val_dataset=3 must be a mapping with a _target_" in line


# -- option values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [
    (["analyze", "m.pt", ".", "--device", "gpu"], "--device 'gpu' is not a device; use cpu, cuda"),
    (["analyze", "m.pt", ".", "--max-batches", "0"], "--max-batches 0 must be >= 1"),
    (["analyze", "m.pt", ".", "--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["demo", "--synthetic", "--steps", "-2"], "--steps -2 must be >= 1"),
    (["zoo", "publish", "runs/a", "--model-id", "m", "--device", "tpu:0"], "--device 'tpu:0' is not a device"),
])
def test_bad_option_values(capsys, argv, expected):
    command = " ".join(argv[:2]) if argv[0] == "zoo" else argv[0]
    assert expected in fails(argv, capsys, command)


def test_a_cuda_device_the_machine_does_not_have(capsys):
    line = fails(["analyze", "m.pt", ".", "--device", "cuda:99"], capsys)
    if torch.cuda.is_available():
        assert f"this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to " in line
    else:
        assert "this machine has no CUDA device (or torch was built without CUDA); use --device cpu." in line


def test_eval_given_the_config_as_source(recipe, capsys):
    line = fails(["eval", str(recipe)], capsys)
    assert f"--config {recipe}" in line


# -- checkpoints, folders, Hub ids ------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["junk_checkpoint", "truncated_checkpoint"])
@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_junk_or_truncated_checkpoint_is_one_line(request, tmp_path, capsys, fixture, command):
    path = request.getfixturevalue(fixture)
    argv = ["eval", str(path)] if command == "eval" else ["analyze", str(path), str(tmp_path), "--out",
                                                           str(tmp_path / "a")]
    fails(argv, capsys)


@pytest.mark.parametrize("fixture", ["junk_checkpoint", "truncated_checkpoint"])
def test_junk_checkpoint_message_names_the_file(request, capsys, fixture):
    """(others' fix: convmoe/engine/checkpoint.py load_checkpoint raising ValueError)"""
    path = request.getfixturevalue(fixture)
    line = fails(["eval", str(path)], capsys)
    assert UNEXPECTED not in line
    assert str(path) in line


def test_eval_of_a_missing_folder_says_so_in_convmoes_words(capsys):
    """(the lead's fix: convmoe/engine/evaluate.py load_model raising FileNotFoundError)"""
    line = fails(["eval", "/no/such/folder"], capsys)
    assert "/no/such/folder" in line
    assert "Repo id must be in the form" not in line


def test_describe_of_a_missing_folder(tmp_path, capsys):
    line = fails(["describe", str(tmp_path / "nowhere")], capsys)
    assert "neither an existing folder nor a Hub repo id" in line


def test_resume_with_a_changed_number_of_experts(tmp_path, capsys):
    """(others' fix: the trainer raising ValueError for a checkpoint that does not fit the model)"""
    config = classification_config(tmp_path / "run", moe_targets="layer4.*.conv2",
                                   moe_config={"num_experts": 4, "top_k": 1})
    config["trainer"]["limit_train_batches"] = 1
    config["trainer"]["limit_val_batches"] = 1
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    line = fails(["train", str(path), "trainer.max_epochs=2", "+trainer.resume=auto",
                  "model.moe_config.num_experts=2"], capsys)
    assert UNEXPECTED not in line
    assert "last.pt" in line
    assert "num_experts" in line


# -- the zoo -------------------------------------------------------------------------------------------------


def test_zoo_check_of_a_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    line = fails(["zoo", "check", "--zoo-dir", str(missing)], capsys, "zoo check")
    assert f"zoo folder {missing} does not exist" in line
    assert "not up to date" not in line


def test_zoo_table_does_not_create_a_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    line = fails(["zoo", "table", "--zoo-dir", str(missing)], capsys, "zoo table")
    assert f"zoo folder {missing} does not exist" in line
    assert not missing.exists()


# -- main's handling: collapsed lines, the catch-all, --debug -------------------------------------------------


def make_command_raise(monkeypatch: pytest.MonkeyPatch, name: str, error: BaseException) -> None:
    from convmoe import cli

    def run(args):
        raise error

    monkeypatch.setattr(cli, "COMMANDS", [dataclasses.replace(c, run=run) if c.name == name else c
                                          for c in cli.COMMANDS])


def test_multi_line_messages_become_one_line(monkeypatch, capsys):
    make_command_raise(monkeypatch, "eval", ValueError("first line\n\tsecond line\n"))
    line = fails(["eval", "x"], capsys)
    assert line == "convmoe eval: error: first line second line"


@pytest.mark.parametrize("error", [AttributeError("'int' object has no attribute 'to'"), KeyError(1785425525),
                                   IndexError("list index out of range"), TypeError("unsupported operand")])
def test_an_unexpected_exception_is_one_line_that_says_how_to_see_it(monkeypatch, capsys, error):
    make_command_raise(monkeypatch, "describe", error)
    line = fails(["describe", "x"], capsys)
    assert f"{type(error).__name__}: " in line
    assert UNEXPECTED in line
    assert "convmoe --debug describe" in line


def test_debug_re_raises_with_the_traceback(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        main(["--debug", "train", str(path)])


# -- a real process -------------------------------------------------------------------------------------------


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    # fvcore (imported by convmoe.flops) warns about torch.jit.script at import: not this contract's business.
    env = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"}
    return subprocess.run([sys.executable, "-m", "convmoe.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_subprocess_yaml_error_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("trainer: [1,\n")
    result = run_cli("train", str(path))
    assert result.returncode == 2, result.stderr
    assert "not valid YAML" in check_one_line(result.stderr, "train")


def test_subprocess_junk_checkpoint_is_one_line_and_debug_shows_the_traceback(junk_checkpoint):
    result = run_cli("eval", str(junk_checkpoint))
    assert result.returncode == 2, result.stderr
    check_one_line(result.stderr, "eval")
    debug = run_cli("--debug", "eval", str(junk_checkpoint))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr


def test_subprocess_zoo_check_of_a_missing_folder(tmp_path):
    result = run_cli("zoo", "check", "--zoo-dir", str(tmp_path / "absent"))
    assert result.returncode == 2, result.stderr
    assert check_one_line(result.stderr, "zoo check").startswith("convmoe zoo check: error: zoo folder ")


# -- --trust-remote-code reaches the loaders ------------------------------------------------------------------


class Stop(Exception):
    """Raised by a stand-in loader once it has recorded its arguments."""


def recorder(calls: list[dict]) -> object:
    def record(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    return record


@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]])
def test_trust_remote_code_reaches_from_pretrained_evaluate_and_load_model(monkeypatch, tmp_path, flag):
    calls: list[dict] = []
    # Patched where the commands use them: convmoe describe, convmoe eval, convmoe analyze (Hub id / revision).
    for module, name in (("convmoe.cli", "from_pretrained"), ("convmoe.engine.cli", "evaluate"),
                         ("convmoe.analysis.command", "load_model"), ("convmoe.analysis.command", "from_pretrained")):
        monkeypatch.setattr(importlib.import_module(module), name, recorder(calls))
    for argv in (["describe", "org/name"], ["eval", "org/name"],
                 ["analyze", "org/name", str(tmp_path), "--out", str(tmp_path / "a")],
                 ["analyze", "org/name", str(tmp_path), "--revision", "v1", "--out", str(tmp_path / "a")]):
        with pytest.raises(Stop):
            main(["--debug", *argv[:1], *flag, *argv[1:]])
    assert [call["trust_remote_code"] for call in calls] == [bool(flag)] * 4


def test_trust_remote_code_help(capsys):
    for command in ("describe", "eval", "analyze"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--trust-remote-code" in out
        assert "outside convmoe's allow-list (timm, smp, torchvision, convmoe.models and registered factories)" in out


@pytest.mark.parametrize("argv", [
    ["eval", "runs/a/best.pt", "--split", "test", "val_dataset.root=x", "+seed=1", "~scheduler"],
    ["eval", "runs/a/best.pt", "val_dataset.root=x", "--split", "test", "+seed=1", "~scheduler"],
    ["eval", "runs/a/best.pt", "val_dataset.root=x", "+seed=1", "--output", "m.json", "~scheduler"],
])
def test_overrides_may_follow_options(argv):
    from convmoe.cli import parse_arguments

    args = parse_arguments(argv)
    assert args.overrides == ["val_dataset.root=x", "+seed=1", "~scheduler"]


def test_an_unknown_option_is_still_an_error(capsys):
    from convmoe.cli import parse_arguments

    with pytest.raises(SystemExit):
        parse_arguments(["eval", "runs/a/best.pt", "--splitt", "test"])
    assert "unrecognized arguments: --splitt test" in capsys.readouterr().err


def test_eval_of_a_folder_without_a_config_says_how_to_name_the_dataset(tmp_path, capsys):
    import convmoe
    from convmoe.cli import main

    folder = convmoe.save_pretrained(convmoe.create_model("timm:test_resnet", num_classes=3), tmp_path / "folder")
    assert main(["eval", str(folder)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("carries no training config; name the dataset with a recipe: --config RECIPE.yaml "
                          "(config= in Python). A zoo card's Usage section gives its recipe.")
    assert "\n" not in error
