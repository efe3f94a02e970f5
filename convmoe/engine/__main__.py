"""``python -m convmoe.engine CONFIG [key=value ...]``: train, the form ``torchrun`` launches.

    torchrun --nproc_per_node 8 -m convmoe.engine configs/camvid_upernet_moe.yaml trainer.max_epochs=100
"""

from __future__ import annotations

import argparse
import sys

from convmoe.engine.cli import add_train_arguments, run_train
from convmoe.errors import report_error


def main(argv: list[str] | None = None) -> int:
    """Parse ``CONFIG [key=value ...]`` and train; an error is one line on stderr (exit status 2),
    its traceback with ``--debug``."""
    parser = argparse.ArgumentParser(prog="python -m convmoe.engine", description="Train from a YAML config.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except Exception as error:
        if args.debug:
            raise
        return report_error(error, parser.prog, f"{parser.prog} --debug")


if __name__ == "__main__":
    sys.exit(main())
