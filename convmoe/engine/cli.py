"""The ``convmoe train`` and ``convmoe eval`` subcommands (registered in :mod:`convmoe.cli`)."""

from __future__ import annotations

import argparse
import json
import math
import os


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
    from convmoe.engine.distributed import cleanup_distributed
    from convmoe.engine.trainer import train

    try:
        result = train(args.config, args.overrides)
    finally:
        cleanup_distributed()
    if result.best_metric is not None and os.environ.get("RANK", "0") == "0":
        print(f"best {result.monitor}={result.best_metric:.4f}  checkpoint: {result.best_checkpoint}")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``convmoe eval SOURCE [key=value ...] [--config CONFIG] [--split val|test] [--output FILE]``.

    The overrides follow SOURCE directly (argparse reads positional arguments in one run).

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
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, written right after SOURCE")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics as JSON. Returns the exit status."""
    from convmoe.engine.evaluate import evaluate

    metrics = evaluate(args.source, config=args.config, overrides=args.overrides, split=args.split)
    text = json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()},
                      indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
