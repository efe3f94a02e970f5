"""``convmoe zoo reproduce``: run a card's own ``convmoe eval`` commands on its folder and compare the metrics
with the numbers the card prints (the published files evaluated again, ``reevaluated`` in its metadata).

The commands name the Hub id; here they run on the local folder, from the repository root (where the recipe
paths of the commands point), with the data where the recipe looks for it (the card's Reproduce section).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path

from convmoe.engine.cli import add_eval_arguments
from convmoe.engine.evaluate import evaluate
from convmoe.zoo.card import split_front_matter
from convmoe.zoo.card_format import metric_scale
from convmoe.zoo.runs import headline_metrics
from convmoe.zoo.schema import CARD_NAME

# Evaluation is deterministic: the tolerance absorbs float summation order across machines and thread counts
# (a fraction metric; percentages get 100 times as much).
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Reproduction:
    """One metric of one variant: what its card prints and what its eval command measured now."""

    model_id: str
    metric: str
    card: float
    measured: float

    @property
    def matches(self) -> bool:
        """Whether the measured value is the card's, within :data:`TOLERANCE` (scaled for percentages)."""
        return abs(self.measured - self.card) <= TOLERANCE * metric_scale(self.metric)


def _eval_arguments(command: str) -> argparse.Namespace:
    words = shlex.split(command)
    if words[:2] != ["convmoe", "eval"]:
        raise ValueError(f"the card's eval command {command!r} is not a `convmoe eval` command; publish the variant again.")
    parser = argparse.ArgumentParser(prog="convmoe eval")
    add_eval_arguments(parser)
    return parser.parse_args(words[2:])


def reproduce_variant(folder: str | Path) -> list[Reproduction]:
    """Run the card's ``eval`` (and ``eval_test``) command on ``folder`` and pair each measured headline metric
    with the card's number.

    Raises:
        FileNotFoundError: No model card in ``folder``, or the data or recipe the command needs is missing.
        ValueError: The card's commands are not ``convmoe eval`` commands.
    """
    folder = Path(folder)
    card = folder / CARD_NAME
    if not card.is_file():
        raise FileNotFoundError(f"{card} does not exist; pass a variant folder of the zoo (zoo/<model id>).")
    meta = split_front_matter(card.read_text(encoding="utf-8"), str(card))[0]["convmoe"]
    measured: dict[str, float] = {}
    for key in ("eval", "eval_test"):
        if key not in meta["commands"]:
            continue
        args = _eval_arguments(meta["commands"][key])
        values = evaluate(str(folder), config=args.config, overrides=args.overrides, split=args.split, progress=False)
        measured.update(headline_metrics({f"{args.split}/{name}": value for name, value in values.items()}))
    return [Reproduction(meta["model_id"], name, float(value), measured.get(name, float("nan")))
            for name, value in meta["reevaluated"].items()]
