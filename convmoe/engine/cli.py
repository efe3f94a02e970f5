"""The ``convmoe train`` and ``convmoe eval`` subcommands (registered in :mod:`convmoe.cli`), and what the
commands share: the config check run before anything is built, and ``--trust-remote-code``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from convmoe.engine.config import load_config
from convmoe.engine.config_check import check_training_config
from convmoe.engine.evaluate import evaluate
from convmoe.engine.processes import cleanup_distributed
from convmoe.engine.settings import TrainerSettings
from convmoe.engine.trainer import train

TRUST_REMOTE_CODE_HELP = ("allow building base models from callables outside convmoe's allow-list (timm, smp, "
                          "torchvision, convmoe.models and registered factories); only for sources you trust")


def add_trust_remote_code_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``, shared by ``describe``, ``eval`` and ``analyze``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_trust_remote_code_argument(parser)
        >>> parser.parse_args([]).trust_remote_code, parser.parse_args(["--trust-remote-code"]).trust_remote_code
        (False, True)
    """
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def parse_device(name: str | None) -> torch.device:
    """The ``torch.device`` a ``--device`` option names; ``"auto"`` or None: CUDA when available, else CPU.

    Raises:
        ValueError: Not a device name, or a CUDA device this machine does not have.

    Example:
        >>> parse_device("cpu")
        device(type='cpu')
        >>> parse_device("gpu")
        Traceback (most recent call last):
        ...
        ValueError: --device 'gpu' is not a device; use cpu, cuda, cuda:1, ... (or auto).
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:1, ... (or auto).") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA device (or torch was built without CUDA); use "
                             "--device cpu.")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
    return device


def check_config(config: str | Path, overrides: Sequence[str] = (), training: bool = False) -> dict[str, Any]:
    """Load a YAML config with its overrides and check its shape and value types, as the commands do
    before building anything (:func:`~convmoe.engine.config_check.check_training_config` with the trainer's
    settings).

    Args:
        config: The YAML file.
        overrides: ``key=value`` overrides.
        training: Also require the sections training needs (model, loss, optimizer, train_dataset).

    Returns:
        The loaded config.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Invalid YAML, overrides or values; the message names the key and the fix.

    Example:
        >>> check_config("no/such.yaml")
        Traceback (most recent call last):
        ...
        FileNotFoundError: config file no/such.yaml does not exist.
    """
    loaded = load_config(config, overrides)
    required = ("model", "loss", "optimizer", "train_dataset") if training else ()
    check_training_config(loaded, TrainerSettings, required)
    return loaded


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``convmoe train CONFIG [key=value ...]``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_train_arguments(parser)
        >>> parser.parse_args(["run.yaml", "trainer.max_epochs=2"]).overrides
        ['trainer.max_epochs=2']
    """
    parser.add_argument("config", help="a YAML training config")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys (trainer.max_epochs=5); +key=value adds, ~key removes")


def run_train(args: argparse.Namespace) -> int:
    """Train; under ``torchrun`` every process runs this. Returns the exit status."""
    check_config(args.config, args.overrides, training=True)
    try:
        result = train(args.config, args.overrides)
    finally:
        cleanup_distributed()
    if result.best_metric is not None and os.environ.get("RANK", "0") == "0":
        print(f"best {result.monitor}={result.best_metric:.4f}  checkpoint: {result.best_checkpoint}")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``convmoe eval SOURCE [key=value ...] [--config CONFIG] [--split val|test|train] [--output FILE]``.

    Read alone by argparse, the overrides must follow SOURCE directly (positional arguments are read in one
    run); the ``convmoe`` command line (:func:`convmoe.cli.parse_arguments`) also takes them after the options.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_eval_arguments(parser)
        >>> args = parser.parse_args(["runs/a/best.pt", "val_dataset.split=test", "--output", "m.json"])
        >>> args.overrides, args.output
        (['val_dataset.split=test'], 'm.json')
    """
    parser.add_argument("source", help="a training checkpoint (.pt), a save_pretrained folder, or a Hub id")
    parser.add_argument("--config", default=None,
                        help="config naming the dataset (default: the checkpoint's own training config)")
    parser.add_argument("--split", default="val", choices=("val", "test", "train"),
                        help="which <split>_dataset of the config to evaluate (default: val)")
    parser.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="score only the first N batches, a quick look (default: the whole split; the recipe's "
                             "trainer.limit_val_batches limits validation in training only)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_trust_remote_code_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, after SOURCE, before or after the options")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics as JSON. Returns the exit status."""
    if Path(args.source).suffix in (".yaml", ".yml"):
        raise ValueError(f"SOURCE {args.source} is a YAML config; convmoe eval takes the model first (a checkpoint .pt, "
                         f"a save_pretrained folder or a Hub id) and the config with --config: convmoe eval MODEL "
                         f"--config {args.source}.")
    if args.config is not None:
        check_config(args.config, args.overrides)
    if args.output and not Path(args.output).parent.is_dir():
        raise FileNotFoundError(f"--output {args.output}: folder {Path(args.output).parent} does not exist; create it "
                                "or write the metrics elsewhere.")
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(f"--max-batches {args.max_batches} must be at least 1; leave it out to score the whole split.")
    metrics = evaluate(args.source, config=args.config, overrides=args.overrides, split=args.split,
                       trust_remote_code=args.trust_remote_code, max_batches=args.max_batches,
                       progress=not args.no_progress)
    if args.max_batches is not None:
        print(f"convmoe eval: scored at most {args.max_batches} batch(es) of the {args.split} split (--max-batches): "
              "not the split's figure.", file=sys.stderr)
    text = json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()},
                      indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
