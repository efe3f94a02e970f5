"""What the trainer reads and returns: the ``trainer`` config section and the result of a run."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convmoe.engine.config_names import check_trainer_keys

#: The callback ``trainer.track_routing`` adds; a name, since analysis sits above the engine.
DEFAULT_ROUTING_TRACKER = "convmoe.analysis.RoutingTrackerCallback"


@dataclass
class TrainerSettings:
    """The ``trainer`` section of a config (``pl_trainer`` is read the same way, with Lightning's names).

    Attributes:
        max_epochs: Epochs to train.
        precision: ``"auto"`` (bf16 autocast on a GPU, fp32 on a CPU), ``"32"``, ``"bf16-mixed"``,
            ``"16-mixed"`` (fp16 with a gradient scaler).
        accelerator: ``"auto"``, ``"cpu"`` or ``"gpu"``.
        gradient_clip_val: Clip the gradient norm to this value (None: no clipping).
        accumulate_grad_batches: Batches per optimizer step.
        limit_train_batches: Train batches per epoch: all (None), a count, or a fraction.
        limit_val_batches: Validation batches likewise.
        check_val_every_n_epoch: Validate every n epochs (and after the last).
        default_root_dir: Output folder: metrics.csv, tensorboard/, checkpoints/, config.yaml.
        enable_progress_bar: Show progress bars (main process only).
        log_every_n_steps: Write step losses to TensorBoard every n optimizer steps.
        routing_stats_every_n_steps: Sample the routing statistics every n training batches.
        track_routing: Also track per-layer specialisation and balance over epochs with the
            ``routing_tracker`` callback (sampled like the routing statistics): logged as
            ``routing/<layer>/<statistic>``, saved to ``routing_history.json`` and plotted to
            ``routing_curves.png`` (with matplotlib). Models without MoE blocks are not tracked.
        routing_tracker: The callback class ``track_routing`` adds, by dotted path (default
            :class:`convmoe.analysis.RoutingTrackerCallback`). The engine names it rather than
            imports it: analysis is a floor above the engine (see :mod:`convmoe.engine.callbacks`).
        monitor: Metric that selects the best checkpoint (default ``val/miou`` for segmentation,
            ``val/top1`` for classification, ``train/loss`` without validation).
        monitor_mode: ``"max"`` or ``"min"`` (default: ``"min"`` for losses, else ``"max"``).
        resume: A checkpoint to resume from, or ``"auto"`` for ``checkpoints/last.pt`` if it exists.
        find_unused_parameters: Passed to DistributedDataParallel (MoE blocks do not need it).
        sync_batchnorm: Convert BatchNorm layers to SyncBatchNorm under torchrun.
        channels_last: Keep the model's weights and the image batches in channels-last memory format
            (timm's ``--channels-last``): the same numbers, faster convs on GPUs and on CPUs with oneDNN.
        seed: Seed for the model's initialisation, the data order (a function of seed and epoch) and
            the random streams.

    Example:
        >>> settings = TrainerSettings(max_epochs=3, precision="bf16-mixed")
        >>> settings.max_epochs, settings.find_unused_parameters
        (3, False)
    """

    max_epochs: int = 1
    precision: str | int = "auto"
    accelerator: str = "auto"
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    check_val_every_n_epoch: int = 1
    default_root_dir: str = "runs/convmoe"
    enable_progress_bar: bool = True
    log_every_n_steps: int = 50
    routing_stats_every_n_steps: int = 10
    track_routing: bool = True
    routing_tracker: str = DEFAULT_ROUTING_TRACKER
    monitor: str | None = None
    monitor_mode: str | None = None
    resume: str | None = None
    find_unused_parameters: bool = False
    sync_batchnorm: bool = False
    channels_last: bool = False
    seed: int | None = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainerSettings:
        """Read ``config["trainer"]`` (or ``config["pl_trainer"]``).

        A key that is no setting is an error naming the closest one; under ``pl_trainer`` (Lightning's
        section), a key unlike any setting (``callbacks``) is named in a warning and ignored.

        Example:
            >>> TrainerSettings.from_config({"pl_trainer": {"max_epochs": 3, "devices": 1}}).max_epochs
            3
        """
        if "trainer" in config and "pl_trainer" in config:
            raise ValueError("the config has both 'trainer' and 'pl_trainer'; keep one.")
        where = "trainer" if "trainer" in config else "pl_trainer"
        section = dict(config.get(where) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        check_trainer_keys(section, known, where)
        settings = cls(**{k: v for k, v in section.items() if k in known})
        if settings.max_epochs < 1 or settings.accumulate_grad_batches < 1 or settings.check_val_every_n_epoch < 1:
            raise ValueError("max_epochs, accumulate_grad_batches and check_val_every_n_epoch must be >= 1.")
        if settings.monitor_mode not in (None, "max", "min"):
            raise ValueError(f"monitor_mode={settings.monitor_mode!r} must be 'max' or 'min'.")
        return settings


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        output_dir: The run's folder.
        monitor: The metric that chose the best checkpoint.
        best_metric: Its best value.
        best_checkpoint: Path of ``best.pt``.
        last_checkpoint: Path of ``last.pt``.
        history: One dict of metrics per epoch (this run's epochs).
        test_metrics: Metrics on ``test_dataset`` with the best weights (empty without one).

    Example:
        >>> result = TrainResult(Path("runs/a"), "val/miou", 0.61, None, None)
        >>> result.monitor, result.history
        ('val/miou', [])
    """

    output_dir: Path
    monitor: str
    best_metric: float | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)
