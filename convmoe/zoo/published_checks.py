"""The checks that published files compute what the run's checkpoint did: outputs on one batch and the
headline metrics evaluated again, within what the storage dtype allows."""

from __future__ import annotations

import math
from pathlib import Path

from convmoe.engine.evaluate import evaluate
from convmoe.zoo.card_format import metric_scale
from convmoe.zoo.runs import RunRecord, headline_metrics
from convmoe.zoo.weights import OutputCheck

# Float16 storage may flip a few near-tie predictions (and so routing decisions); more is a bug.
FLOAT16_MIN_AGREEMENT = 0.99
FLOAT32_MIN_AGREEMENT = 0.999
# Largest change of a headline metric when the published files are evaluated again, in the metric's
# own units per point of scale (percentages: x100): float32 only moves by kernel nondeterminism.
METRIC_TOLERANCE = {"float32": 0.001, "float16": 0.005}


def check_round_trip(check: OutputCheck, dtype: str) -> None:
    """Raise unless the saved folder's outputs on one val batch agree with the checkpoint's as ``dtype`` allows.

    Example:
        >>> check_round_trip(OutputCheck(0.01, 3.0, 0.995), "float16")
    """
    minimum = FLOAT16_MIN_AGREEMENT if dtype == "float16" else FLOAT32_MIN_AGREEMENT
    if check.agreement < minimum:
        raise ValueError(f"the published {dtype} weights change {100 * (1 - check.agreement):.2f}% of the predictions "
                         f"on one val batch (max |logit change| {check.max_abs_diff:.3g}, allowed "
                         f"{100 * (1 - minimum):.2f}%); publish without --float16." if dtype == "float16" else
                         f"the saved folder does not compute what the checkpoint does (agreement "
                         f"{check.agreement:.4f}); the base recipe does not rebuild the model.")


def reevaluate(folder: Path, run: RunRecord, dtype: str, tolerance: float | None) -> dict[str, float]:
    """The published files evaluated again on the val split (and the test split when the run logged
    one), checked against the run's logged metrics."""
    reevaluated: dict[str, float] = {}
    for split in ("val", "test") if run.test_metrics else ("val",):
        measured = evaluate(str(folder), config=run.config, split=split, progress=False)
        reevaluated.update(headline_metrics({f"{split}/{name}": value for name, value in measured.items()}))
    for name, expected in run.headline().items():
        value = reevaluated.get(name, math.nan)
        allowed = (tolerance if tolerance is not None else METRIC_TOLERANCE[dtype] * metric_scale(name))
        if not abs(value - expected) <= allowed:
            raise ValueError(f"the published {dtype} files evaluate to {name}={value:.6g}, the run logged {expected:.6g} "
                             f"(allowed change {allowed:g}); " + ("publish without --float16." if dtype == "float16"
                                                                   else "the folder does not rebuild the checkpoint."))
    return reevaluated
