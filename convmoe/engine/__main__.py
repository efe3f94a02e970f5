"""``python -m convmoe.engine CONFIG [key=value ...]``: train, the form ``torchrun`` launches.

    torchrun --nproc_per_node 8 -m convmoe.engine configs/camvid_upernet_moe.yaml trainer.max_epochs=100
"""

from __future__ import annotations

import argparse
import sys

from convmoe.engine.cli import add_train_arguments, run_train


def main(argv: list[str] | None = None) -> int:
    """Parse ``CONFIG [key=value ...]`` and train."""
    parser = argparse.ArgumentParser(prog="python -m convmoe.engine", description="Train from a YAML config.")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
