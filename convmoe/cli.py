"""The ``convmoe`` command line: a thin argparse layer; the work lives in convmoe.demo and convmoe.hub.

Each subcommand is one :class:`Command` in :data:`COMMANDS` (its arguments and the function that
runs it), so a new subcommand (train, eval, zoo, analyze) is one more entry.

    convmoe demo                 patch the ImageNet EfficientNet-Lite0, check predictions, train, stats
    convmoe demo --synthetic     one MoEConv2d on synthetic data (no extra package)
    convmoe describe PATH|ID     what a saved checkpoint (folder, Hub id, .pt) replaced, experts, params, FLOPs
    convmoe data prepare DATASET SOURCE OUT   a public download (CIFAR-10, CamVid) in the layout the recipes read
    convmoe train CONFIG [k=v]   train from a YAML config (convmoe.engine)
    convmoe eval SOURCE          evaluate a checkpoint, folder or Hub id on a config's dataset
    convmoe analyze MODEL DATA   routing heatmaps, maps, specialisation, balance, layer redundancy (convmoe.analysis)
    convmoe zoo publish|table|check|push   the model zoo (convmoe.zoo)

Errors: a bad input (file, YAML, value, path, Hub id) ends in one line on stderr,
``convmoe <command>: error: <problem and fix>``, and exit status 2; ``convmoe --debug <command>``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import convmoe
from convmoe import __version__, demo
from convmoe.analysis import command as analysis_command
from convmoe.data import command as data_command
from convmoe.engine import cli as engine_cli
from convmoe.engine.evaluate import load_model
from convmoe.engine.saved_models import CHECKPOINT_SUFFIXES
from convmoe.errors import report_error
from convmoe.hub import from_pretrained
from convmoe.zoo import command as zoo_command


@dataclass(frozen=True)
class Command:
    """One ``convmoe`` subcommand.

    Attributes:
        name: The subcommand (``convmoe NAME``).
        help: One line for ``convmoe --help``.
        add_arguments: Adds the subcommand's arguments to its parser.
        run: Runs it with the parsed arguments; returns the exit status.

    Example:
        >>> command = Command("hello", "say hello", lambda parser: None, lambda args: 0)
        >>> command.run(argparse.Namespace())
        0
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--synthetic", action="store_true",
                        help="train one MoEConv2d on synthetic data instead (no extra package needed)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 8, synthetic 40)")
    parser.add_argument("--targets", default="last_stage",
                        help="convmoe.patch targets in EfficientNet-Lite0 (default: last_stage)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_demo(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1.")
    options = {"seed": args.seed, "progress": not args.no_progress}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.synthetic:
        demo.run_synthetic_demo(**options)
        return 0
    result = demo.run_demo(targets=args.targets, **options)
    return 0 if result.top5_unchanged else 1


def _describe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a folder written by convmoe.save_pretrained, a Hub repo id 'org/name', or a "
                                     "convmoe train checkpoint (.pt)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (default: main)")
    engine_cli.add_trust_remote_code_argument(parser)


def _run_describe(args: argparse.Namespace) -> int:
    if Path(args.path).suffix in CHECKPOINT_SUFFIXES:  # a `convmoe train` checkpoint: its own (checked) config
        if args.revision is not None:
            raise ValueError(f"--revision applies to Hub repos only; {args.path} is a local checkpoint file.")
        model, _ = load_model(args.path, trust_remote_code=args.trust_remote_code)
    else:
        model = from_pretrained(args.path, revision=args.revision, trust_remote_code=args.trust_remote_code)
    print(convmoe.describe(model))
    return 0


COMMANDS: list[Command] = [
    Command("demo", "patch a pretrained EfficientNet-Lite0, check its predictions, train a few steps, print "
            "routing statistics", _demo_arguments, _run_demo),
    Command("describe", "print what a saved checkpoint replaced, its experts, parameters and FLOPs",
            _describe_arguments, _run_describe),
    Command("data", "prepare a public download (CIFAR-10, CamVid) in the layout the recipes read",
            data_command.add_arguments, data_command.run),
    Command("train", "train from a YAML config (key=value overrides); under torchrun, on every process",
            engine_cli.add_train_arguments, engine_cli.run_train),
    Command("eval", "metrics of a training checkpoint, save_pretrained folder or Hub id on a config's dataset",
            engine_cli.add_eval_arguments, engine_cli.run_eval),
    Command("analyze", "routing analysis of a model on a dataset: expert x class heatmaps, routing maps, "
            "specialisation and balance, layer redundancy", analysis_command.add_arguments, analysis_command.run),
    Command("zoo", "model zoo: publish engine runs as Hub folders with model cards, regenerate the table, check, "
            "reproduce the cards' numbers, push, list", zoo_command.add_arguments, zoo_command.run),
]


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The ``convmoe`` argument parser, one subparser per command (default: :data:`COMMANDS`).

    Example:
        >>> build_parser().parse_args(["demo", "--synthetic"]).synthetic
        True
    """
    parser = argparse.ArgumentParser(prog="convmoe", description="Sparse Mixture-of-Experts for CNNs.")
    parser.add_argument("--version", action="version", version=f"convmoe {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of the one-line message")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS if commands is None else commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run, command_prog=sub.prog)  # a nested subcommand may set a longer prog
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, read by :func:`build_parser`; ``key=value`` / ``+key=value`` / ``~key`` overrides may also
    follow the options (``convmoe eval best.pt --split test val_dataset.root=...``).

    Example:
        >>> parse_arguments(["eval", "best.pt", "--split", "test", "val_dataset.root=x"]).overrides
        ['val_dataset.root=x']
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(_is_override(item) for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _is_override(item: str) -> bool:
    return not item.startswith("-") and ("=" in item or item.startswith("~"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convmoe`` console script; returns the exit status.

    Any error is printed as one line on stderr, ``convmoe <command>: error: <message>``, without a
    traceback, with exit status 2 (see :func:`convmoe.errors.error_message`); ``--debug`` re-raises it instead.

    Example:
        >>> main(["demo", "--synthetic", "--steps", "1", "--no-progress"])  # doctest: +ELLIPSIS
        Synthetic demo: ...
        0
    """
    args = parse_arguments(argv)
    try:
        return args.run(args)
    except Exception as error:
        if args.debug:
            raise
        command = args.command_prog.removeprefix("convmoe ")
        return report_error(error, f"convmoe {command}", f"convmoe --debug {command}")


if __name__ == "__main__":
    sys.exit(main())
