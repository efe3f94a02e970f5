"""Reading engine run folders: the best epoch's metrics from ``metrics.csv``, checked against ``best.pt``.

A run folder is what ``convmoe train`` writes::

    RUN/config.yaml  RUN/metrics.csv  RUN/checkpoints/best.pt  RUN/checkpoints/last.pt

The numbers of a zoo card come from here only: the row of ``metrics.csv`` for the epoch that
``best.pt`` holds, whose monitored value must equal the checkpoint's ``best_metric``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convmoe.engine.checkpoint import load_checkpoint

# The headline metrics of a card, in display order; per-class IoUs and losses are kept apart.
HEADLINE_METRICS = ("miou", "pixel_accuracy", "top1", "top5")
# Config keys that may differ between the seeds of one recipe (where a run writes, how it shows progress).
SEED_FREE_KEYS = ("seed", "default_root_dir", "resume", "enable_progress_bar", "log_every_n_steps")
LOADER_FREE_KEYS = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")


@dataclass(frozen=True)
class RunRecord:
    """One finished training run, as a zoo card reads it.

    Attributes:
        run_dir: The run folder.
        config: The resolved training config stored in ``best.pt``.
        seed: ``trainer.seed`` of the run.
        monitor: The metric that chose the best checkpoint (``val/miou``, ``val/top1``).
        best_epoch: Epoch of ``best.pt``.
        best_step: Optimizer steps at that epoch.
        metrics: Every ``val/*`` value of the best epoch's row (NaN where the run logged none).
        test_metrics: The ``test/*`` row, when the config had a ``test_dataset``.
        checkpoint: Path of ``best.pt``.

    Example:
        >>> record = RunRecord(Path("runs/a"), {}, 0, "val/top1", 3, 120, {"val/top1": 91.5})
        >>> record.headline()
        {'val/top1': 91.5}
    """

    run_dir: Path
    config: dict[str, Any]
    seed: int
    monitor: str
    best_epoch: int
    best_step: int
    metrics: dict[str, float]
    test_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None

    @property
    def task(self) -> str:
        """``"segmentation"`` when the run logged mIoU, else ``"classification"``."""
        return "segmentation" if "val/miou" in self.metrics else "classification"

    def headline(self) -> dict[str, float]:
        """The headline metrics (:data:`HEADLINE_METRICS`) of the best epoch, validation then test."""
        return headline_metrics({**self.metrics, **self.test_metrics})


def headline_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The ``val/``/``test/`` headline metrics of ``metrics``, in display order.

    Example:
        >>> headline_metrics({"val/loss": 0.3, "val/top5": 99.0, "val/top1": 90.0, "test/top1": 89.0})
        {'val/top1': 90.0, 'val/top5': 99.0, 'test/top1': 89.0}
    """
    return {f"{split}/{name}": float(metrics[f"{split}/{name}"]) for split in ("val", "test")
            for name in HEADLINE_METRICS if f"{split}/{name}" in metrics}


def per_class_iou(metrics: Mapping[str, float]) -> dict[str, float]:
    """The per-class IoUs (``val/iou/<class>``) of a run's metrics, by class name.

    Example:
        >>> per_class_iou({"val/miou": 0.5, "val/iou/sky": 0.9})
        {'sky': 0.9}
    """
    return {name.removeprefix("val/iou/"): value for name, value in metrics.items() if name.startswith("val/iou/")}


def _number(text: str) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_run(run_dir: str | Path) -> RunRecord:
    """Read a ``convmoe train`` output folder.

    Args:
        run_dir: The folder (``trainer.default_root_dir`` of the run).

    Returns:
        The run's best epoch with its metrics.

    Raises:
        FileNotFoundError: No ``metrics.csv`` or ``checkpoints/best.pt``.
        ValueError: ``metrics.csv`` has no row for the best epoch, or its monitored value differs
            from the checkpoint's (files from two different runs).

    Example:
        >>> read_run("runs/nothing")
        Traceback (most recent call last):
        ...
        FileNotFoundError: runs/nothing/metrics.csv does not exist; publish reads a folder written by `convmoe train` (metrics.csv and checkpoints/best.pt). Check the path, or train first.
    """
    run_dir = Path(run_dir)
    metrics_path, checkpoint = run_dir / "metrics.csv", run_dir / "checkpoints" / "best.pt"
    for path in (metrics_path, checkpoint):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; publish reads a folder written by `convmoe train` "
                                    "(metrics.csv and checkpoints/best.pt). Check the path, or train first.")
    state = load_checkpoint(checkpoint)
    monitor, epoch, best = state.get("monitor"), state.get("epoch"), state.get("best_metric")
    config = state.get("config")
    if not isinstance(monitor, str) or not isinstance(epoch, int) or not isinstance(config, dict):
        # ValueError: a checkpoint with the wrong content, as load_checkpoint reports one.
        raise ValueError(f"{checkpoint} lacks the monitor, epoch or config that `convmoe train` records; it was not "  # noqa: TRY004
                         "written by the engine's trainer.")
    if not monitor.startswith("val/"):
        raise ValueError(f"{run_dir} chose its best checkpoint on {monitor!r}; a zoo card reports validation "
                         "metrics, so train with a val_dataset (the monitor is then val/miou or val/top1).")
    rows = _read_rows(metrics_path)
    candidates = [row for row in rows if _number(row.get("epoch", "")) == epoch and _number(row.get(monitor, ""))
                  is not None]
    if not candidates:
        raise ValueError(f"{metrics_path} has no row for epoch {epoch} with {monitor}, the epoch of {checkpoint}; the "
                         "folder mixes files of different runs. Train again into an empty folder.")
    row = candidates[-1]
    logged = _number(row[monitor])
    if best is None or not math.isclose(logged, float(best), rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"{metrics_path} logs {monitor}={logged} at epoch {epoch} but {checkpoint} records "
                         f"best_metric={best}; the folder mixes files of different runs. Train again into an empty "
                         "folder.")
    metrics = {key: (value if value is not None else math.nan) for key in row if key.startswith("val/")
               for value in [_number(row[key])]}
    test_rows = [r for r in rows if any(k.startswith("test/") and (r.get(k) or "").strip() for k in r)]
    test_metrics = ({key: (value if value is not None else math.nan) for key in test_rows[-1]
                     if key.startswith("test/") for value in [_number(test_rows[-1][key])]} if test_rows else {})
    trainer = config.get("trainer", config.get("pl_trainer")) or {}
    seed = trainer.get("seed", 0)
    return RunRecord(run_dir=run_dir, config=config, seed=int(seed if seed is not None else 0), monitor=monitor,
                     best_epoch=epoch, best_step=int(_number(row.get("step", "")) or state.get("global_step", 0)),
                     metrics=metrics, test_metrics=test_metrics, checkpoint=checkpoint)


def mean_and_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1) of ``values``; None spread for one value.

    Example:
        >>> mean_and_spread([1.0, 2.0, 3.0])
        (2.0, 1.0)
        >>> mean_and_spread([0.5])
        (0.5, None)
    """
    if not values:
        raise ValueError("mean_and_spread() needs at least one value.")
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize_runs(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """Mean, spread and per-seed values of the headline metrics over the seeds of one recipe.

    Returns:
        ``{"seeds", "metrics" (means), "metrics_std" (sample std, None for one seed), "runs"
        (per seed: seed, epoch, step, run folder name, metrics)}``; per-class IoUs are averaged
        into ``"per_class_iou"`` for segmentation.

    Raises:
        ValueError: The runs log different headline metrics.

    Example:
        >>> a = RunRecord(Path("a"), {}, 0, "val/top1", 1, 2, {"val/top1": 90.0})
        >>> b = RunRecord(Path("b"), {}, 1, "val/top1", 1, 2, {"val/top1": 92.0})
        >>> summary = summarize_runs([a, b])
        >>> summary["metrics"], round(summary["metrics_std"]["val/top1"], 3)
        ({'val/top1': 91.0}, 1.414)
    """
    names = list(runs[0].headline())
    for run in runs[1:]:
        if list(run.headline()) != names:
            raise ValueError(f"{run.run_dir} logs {list(run.headline())}, {runs[0].run_dir} logs {names}; seeds of one "
                             "recipe must log the same metrics.")
    summary: dict[str, Any] = {"seeds": [run.seed for run in runs], "metrics": {}, "metrics_std": {}, "runs": []}
    for name in names:
        mean, spread = mean_and_spread([run.headline()[name] for run in runs])
        summary["metrics"][name] = mean
        summary["metrics_std"][name] = spread
    for run in runs:
        summary["runs"].append({"seed": run.seed, "epoch": run.best_epoch, "step": run.best_step,
                                "run": run.run_dir.name, "metrics": run.headline()})
    classes = per_class_iou(runs[0].metrics)
    if classes:
        summary["per_class_iou"] = {}
        for name in classes:
            values = [per_class_iou(run.metrics).get(name, math.nan) for run in runs]
            finite = [v for v in values if math.isfinite(v)]
            summary["per_class_iou"][name] = statistics.fmean(finite) if len(finite) == len(values) else None
    return summary


def _without(config: Mapping[str, Any], dotted_keys: set[str], prefix: str = "") -> Any:
    if isinstance(config, Mapping):
        return {k: _without(v, dotted_keys, f"{prefix}{k}.") for k, v in config.items()
                if f"{prefix}{k}" not in dotted_keys and k not in LOADER_FREE_KEYS}
    if isinstance(config, list):
        return [_without(v, dotted_keys, f"{prefix}{i}.") for i, v in enumerate(config)]
    return config


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = list(dict.fromkeys([*a, *b]))
        return [d for k in keys for d in (_differing_keys(a.get(k), b.get(k), f"{prefix}{k}.")
                                          if k in a and k in b else [f"{prefix}{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differing_keys(x, y, f"{prefix}{i}.")]
    return [] if a == b and type(a) is type(b) else [prefix.rstrip(".")]


def first_phase(run: RunRecord) -> RunRecord | None:
    """The run whose checkpoint ``run`` started from: its ``init_from`` names ``RUN/checkpoints/<file>.pt`` of a
    ``convmoe train`` folder (``RUN/config.yaml`` beside it). None for any other start (none, a Hub id, a
    ``save_pretrained`` folder, a file outside a run folder).

    Example:
        >>> first_phase(RunRecord(Path("b"), {"init_from": "convmoe/net"}, 0, "val/top1", 1, 2, {})) is None
        True
    """
    source = run.config.get("init_from")
    if not isinstance(source, str):
        return None
    path = Path(source)
    if path.suffix != ".pt" or path.parent.name != "checkpoints" or not (path.parent.parent / "config.yaml").is_file():
        return None
    return read_run(path.parent.parent)


def check_same_recipe(runs: Sequence[RunRecord]) -> None:
    """Raise unless ``runs`` are seeds of one recipe: configs equal but for the seed, the output folder
    and loader settings, and no seed repeated. Runs that each start from another run (:func:`first_phase`)
    may start from different ones, when those are seeds of one recipe in turn.

    Raises:
        ValueError: Names the differing config keys or the repeated seed.

    Example:
        >>> a = RunRecord(Path("a"), {"trainer": {"seed": 0}, "lr": 0.1}, 0, "val/top1", 1, 2, {})
        >>> b = RunRecord(Path("b"), {"trainer": {"seed": 1}, "lr": 0.1}, 1, "val/top1", 1, 2, {})
        >>> check_same_recipe([a, b])
    """
    free = {f"{section}.{key}" for section in ("trainer", "pl_trainer") for key in SEED_FREE_KEYS}
    phases = [first_phase(run) for run in runs] if len(runs) > 1 else []
    if phases and all(phase is not None for phase in phases):
        try:
            check_same_recipe(phases)
        except ValueError as error:
            raise ValueError(f"the first phases of {[str(r.run_dir) for r in runs]} (their init_from runs) are not "
                             f"seeds of one recipe: {error}") from None
        free.add("init_from")
    reference = _without(runs[0].config, free)
    for run in runs[1:]:
        differing = _differing_keys(reference, _without(run.config, free))
        if differing:
            hint = (" init_from names no run folder here for some of them (RUN/checkpoints/<file>.pt beside "
                    "RUN/config.yaml); publish from where the runs were trained." if "init_from" in differing else "")
            raise ValueError(f"{run.run_dir} is not a seed of {runs[0].run_dir}: their configs differ in "
                             f"{differing[:8]}; --seeds takes runs of the same recipe that differ only in "
                             f"trainer.seed (and the output folder).{hint}")
    seen: dict[int, Path] = {}
    for run in runs:
        if run.seed in seen:
            raise ValueError(f"{run.run_dir} and {seen[run.seed]} both trained with trainer.seed={run.seed}; seeds "
                             "must differ (train with trainer.seed=N).")
        seen[run.seed] = run.run_dir


def check_comparable(runs: Sequence[RunRecord], twins: Sequence[RunRecord]) -> None:
    """Raise unless the dense twin runs were validated on the same data, the same way, as ``runs``.

    Raises:
        ValueError: A different ``val_dataset``, monitor or metric set.

    Example:
        >>> a = RunRecord(Path("a"), {"val_dataset": {"split": "val"}}, 0, "val/miou", 1, 2, {"val/miou": 0.5})
        >>> check_comparable([a], [a])
    """
    main = runs[0]
    for twin in twins:
        if _differing_keys(_without(main.config.get("val_dataset"), set()),
                           _without(twin.config.get("val_dataset"), set())):
            raise ValueError(f"dense twin {twin.run_dir} was validated on a different val_dataset than "
                             f"{main.run_dir}; a twin must be measured on the same data (same recipe, dense model).")
        if twin.monitor != main.monitor or list(twin.headline()) != list(main.headline()):
            raise ValueError(f"dense twin {twin.run_dir} reports {list(twin.headline())} (monitor {twin.monitor}), "
                             f"{main.run_dir} reports {list(main.headline())} (monitor {main.monitor}); they are not "
                             "comparable.")
