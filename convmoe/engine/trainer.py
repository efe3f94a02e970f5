"""The training loop: a config in, a trained model, checkpoints and logged metrics out.

    config (YAML)  -> model, loss, datasets + loaders, optimizer, schedulers     (_target_ instantiation)
    each epoch     -> train: autocast forward, task loss + convmoe.aux_loss(model), backward, step
                      routing statistics averaged over the epoch (MEDoE: extra/train_medoe_*)
                   -> validate: metrics summed over processes (exact under torchrun)
                   -> metrics.csv, TensorBoard, checkpoints/last.pt and best.pt (on the monitored metric)

Resuming continues the same run: the training loader's order is a function of (seed, epoch), and
checkpoints carry every RNG state, so a run killed at any point and resumed from ``last.pt`` ends
bit-identical to the uninterrupted one (on a CPU; GPU kernels may not be deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import convmoe
from convmoe.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from convmoe.engine.config import instantiate, load_config, locate
from convmoe.engine.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    setup_distributed,
)
from convmoe.engine.evaluate import (
    autocast,
    limit_batches,
    loss_ignore_index,
    model_output,
    resolve_precision,
    run_evaluation,
    split_batch,
)
from convmoe.engine.loaders import build_dataloader, epoch_seed
from convmoe.engine.logging import CSVLogger, TensorBoardLogger

# Lightning Trainer keys that mean nothing here: torchrun decides the processes and nodes.
_LAUNCHER_KEYS = ("devices", "num_nodes", "strategy")


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
        track_routing: Also track per-layer specialisation and balance over epochs
            (:class:`convmoe.analysis.RoutingTracker`, sampled like the routing statistics): logged as
            ``routing/<layer>/<statistic>``, saved to ``routing_history.json`` and plotted to
            ``routing_curves.png`` (with matplotlib). Models without MoE blocks are not tracked.
        monitor: Metric that selects the best checkpoint (default ``val/miou`` for segmentation,
            ``val/top1`` for classification, ``train/loss`` without validation).
        monitor_mode: ``"max"`` or ``"min"`` (default: ``"min"`` for losses, else ``"max"``).
        resume: A checkpoint to resume from, or ``"auto"`` for ``checkpoints/last.pt`` if it exists.
        find_unused_parameters: Passed to DistributedDataParallel (MoE blocks do not need it).
        sync_batchnorm: Convert BatchNorm layers to SyncBatchNorm under torchrun.
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
    monitor: str | None = None
    monitor_mode: str | None = None
    resume: str | None = None
    find_unused_parameters: bool = False
    sync_batchnorm: bool = False
    seed: int | None = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainerSettings:
        """Read ``config["trainer"]`` (or ``config["pl_trainer"]``); unknown keys are named in a warning.

        Example:
            >>> TrainerSettings.from_config({"pl_trainer": {"max_epochs": 3, "devices": 1}}).max_epochs
            3
        """
        if "trainer" in config and "pl_trainer" in config:
            raise ValueError("the config has both 'trainer' and 'pl_trainer'; keep one.")
        section = dict(config.get("trainer", config.get("pl_trainer")) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known - set(_LAUNCHER_KEYS))
        if unknown:
            warnings.warn(f"trainer settings {unknown} are not supported and are ignored; supported: {sorted(known)}.",
                          UserWarning, stacklevel=2)
        settings = cls(**{k: v for k, v in section.items() if k in known})
        if settings.max_epochs < 1 or settings.accumulate_grad_batches < 1 or settings.check_val_every_n_epoch < 1:
            raise ValueError("max_epochs, accumulate_grad_batches and check_val_every_n_epoch must be >= 1.")
        if settings.monitor_mode not in (None, "max", "min"):
            raise ValueError(f"monitor_mode={settings.monitor_mode!r} must be 'max' or 'min'.")
        return settings


@dataclass
class ScheduledLR:
    """A learning-rate scheduler and when it steps (Lightning's ``interval`` and ``frequency``)."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None


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


def _fill_total_steps(node: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    # Schedulers such as OneCycleLR need the run's length; fill it when the config leaves it out.
    node = dict(node)
    target = locate(node["_target_"])
    parameters = inspect.signature(target).parameters
    if "total_steps" in parameters and node.get("total_steps") is None:
        node["total_steps"] = total_steps
    return node


class Trainer:
    """Train and validate a model described by a config; see the module docstring for the loop.

    Config sections: ``model``, ``loss``, ``optimizer`` (required); ``train_dataset`` (required),
    ``val_dataset``, ``test_dataset`` (each a ``_target_`` or a list, with ``data_loader``
    settings; a top-level ``data_loader`` gives defaults); ``scheduler`` or ``scheduler_list``;
    ``trainer`` (or ``pl_trainer``, see :class:`TrainerSettings`); ``task``
    (``classification``/``segmentation``/``auto``); ``ignore_index`` (default: the loss's);
    ``init_encoder_from`` (a ``_target_`` giving a backbone whose weights go to an smp encoder).

    Args:
        config: A config dict or a YAML path.
        overrides: ``key=value`` overrides.

    Example:
        >>> trainer = Trainer("configs/camvid_upernet_moe.yaml", ["trainer.max_epochs=1"])  # doctest: +SKIP
        >>> result = trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, config: Mapping[str, Any] | str | Path, overrides: Sequence[str] = ()) -> None:
        self.config = load_config(config, overrides)
        for key in ("model", "loss", "optimizer", "train_dataset"):
            if key not in self.config:
                raise ValueError(f"the config has no {key!r} section; a training config needs model, loss, optimizer "
                                 "and train_dataset.")
        self.settings = TrainerSettings.from_config(self.config)
        self.ctx = setup_distributed(self.settings.accelerator)
        self.precision = resolve_precision(self.settings.precision, self.ctx.device)
        self.output_dir = Path(self.settings.default_root_dir)
        self.task = self.config.get("task", "auto")
        self.seed = seed = self.settings.seed or 0
        torch.manual_seed(seed)

        model = instantiate(self.config["model"])
        if self.config.get("init_encoder_from") is not None:
            from convmoe.models import load_encoder_weights

            load_encoder_weights(model, instantiate(self.config["init_encoder_from"]))
        if self.ctx.distributed and self.settings.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.ctx.device)
        if self.ctx.distributed:
            device_ids = [self.ctx.local_rank] if self.ctx.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids,
                                                 find_unused_parameters=self.settings.find_unused_parameters)
        self.loss_fn = instantiate(self.config["loss"])
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn = self.loss_fn.to(self.ctx.device)
        self.ignore_index = self.config.get("ignore_index", loss_ignore_index(self.loss_fn))

        loader_defaults = self.config.get("data_loader") or {}
        self.train_loader = build_dataloader(self.config["train_dataset"], loader_defaults, self.ctx, True, seed)
        self.val_loader = (build_dataloader(self.config["val_dataset"], loader_defaults, self.ctx, False, seed)
                           if self.config.get("val_dataset") else None)
        named = self.val_loader.dataset if self.val_loader is not None else self.train_loader.dataset
        self.class_names = getattr(named, "classes", None)
        self.train_batches = limit_batches(self.settings.limit_train_batches, len(self.train_loader))
        self.steps_per_epoch = math.ceil(self.train_batches / self.settings.accumulate_grad_batches)

        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = instantiate(self.config["optimizer"], params=parameters)
        self.schedulers = self._build_schedulers()
        use_scaler = self.precision == "16-mixed" and self.ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=use_scaler)

        self.monitor = self.settings.monitor or self._default_monitor()
        mode = self.settings.monitor_mode or ("min" if self.monitor.endswith("loss") else "max")
        self.better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
        self.start_epoch, self.global_step, self.best_metric = 0, 0, None
        self._check_schedule_lengths()
        self.tracker = self._build_tracker()
        torch.manual_seed(seed + self.ctx.rank)  # routing noise and expert dropout differ between processes

    # ---- construction helpers ----------------------------------------------------------------

    def _default_monitor(self) -> str:
        if self.val_loader is None:
            return "train/loss"
        task = self.task
        if task == "auto":
            _, target = split_batch(next(iter(self.val_loader)))
            task = "segmentation" if target.dim() == 3 else "classification"
        return "val/miou" if task == "segmentation" else "val/top1"

    def _build_tracker(self) -> Any:
        """A :class:`~convmoe.analysis.RoutingTracker` on the model, or None (off, or no MoE block)."""
        from convmoe.analysis import RoutingTracker
        from convmoe.analysis.layers import moe_layers

        if not self.settings.track_routing or next(moe_layers(self.model), None) is None:
            return None
        num_classes = len(self.class_names) if self.class_names else None
        if self.ctx.distributed and num_classes is None:
            warnings.warn("routing tracking is off: under torchrun it needs the number of classes, and the datasets "
                          "have no 'classes' attribute.", UserWarning, stacklevel=3)
            return None
        return RoutingTracker(ignore_index=self.ignore_index, num_classes=num_classes).attach(self.model)

    def _build_schedulers(self) -> list[ScheduledLR]:
        entries = list(self.config.get("scheduler_list") or [])
        if self.config.get("scheduler") is not None:
            entries.append(self.config["scheduler"])
        schedulers = []
        for entry in entries:
            spec = dict(entry) if "scheduler" in entry else {"scheduler": entry}
            interval = spec.get("interval", "epoch")
            if interval not in ("epoch", "step"):
                raise ValueError(f"scheduler interval={interval!r} must be 'epoch' or 'step'.")
            total = self.settings.max_epochs * (self.steps_per_epoch if interval == "step" else 1)
            node = _fill_total_steps(spec["scheduler"], total)
            schedulers.append(ScheduledLR(instantiate(node, optimizer=self.optimizer), interval,
                                          int(spec.get("frequency", 1)), spec.get("monitor")))
        return schedulers

    def _scheduler_steps_at_end(self, scheduled: ScheduledLR) -> int:
        """The step count (``last_epoch``) ``scheduled`` reaches when this run ends at ``max_epochs``."""
        frequency, done = scheduled.frequency, scheduled.scheduler.last_epoch
        if scheduled.interval == "step":
            end = self.global_step + (self.settings.max_epochs - self.start_epoch) * self.steps_per_epoch
            return done + max(end // frequency - self.global_step // frequency, 0)
        return done + max(self.settings.max_epochs // frequency - self.start_epoch // frequency, 0)

    def _check_schedule_lengths(self, resumed: str | None = None, saved_config: Mapping[str, Any] | None = None) -> None:
        """Fail now, not mid-epoch, where a fixed-length schedule (OneCycleLR's ``total_steps``) ends
        before ``max_epochs`` does; ``resumed`` names the checkpoint a resumed run loaded."""
        max_epochs = self.settings.max_epochs
        for scheduled in self.schedulers:
            total = getattr(scheduled.scheduler, "total_steps", None)
            if not isinstance(total, int):
                continue
            needed = self._scheduler_steps_at_end(scheduled)
            if needed <= total:
                continue
            name = type(scheduled.scheduler).__name__
            if resumed is None:
                per_epoch = f" x {self.steps_per_epoch} steps per epoch" if scheduled.interval == "step" else ""
                raise ValueError(f"the {name} schedule has total_steps={total}, but this run takes {needed} steps "
                                 f"(max_epochs={max_epochs}{per_epoch}); raise total_steps, or leave it out to have "
                                 "it filled from max_epochs.")
            original = _trainer_section(saved_config).get("max_epochs")
            fixed_by = f" by the original max_epochs={original}" if original is not None else " by the original run"
            raise ValueError(f"cannot resume {resumed} with trainer.max_epochs={max_epochs}: its {name} schedule was "
                             f"fixed at total_steps={total}{fixed_by}, and max_epochs={max_epochs} needs {needed} "
                             "steps; to train longer start a new run (a new trainer.default_root_dir), or use a "
                             "scheduler without a fixed length (e.g. CosineAnnealingLR).")

    # ---- checkpoints --------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        """Where ``last.pt`` and ``best.pt`` go."""
        return self.output_dir / "checkpoints"

    def set_loader_epoch(self, epoch: int) -> None:
        """Put the training loader at the start of ``epoch``: its order and worker seeds then depend
        on (seed, epoch, rank) only, as a resumed run needs.

        Example:
            >>> trainer.set_loader_epoch(3)  # doctest: +SKIP
        """
        sampler = getattr(self.train_loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        if self.train_loader.generator is not None:
            self.train_loader.generator.manual_seed(epoch_seed(self.seed, epoch, self.ctx.rank))

    def state_dict(self, epoch: int, metrics: Mapping[str, Any],
                   rng_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to resume after ``epoch``, the RNG states included.

        Args:
            epoch: The epoch just finished.
            metrics: Its logged metrics.
            rng_states: Every process's :meth:`capture_rng_state`, by rank (default: this process's alone).
        """
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedulers": [s.scheduler.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "monitor": self.monitor,
            "best_metric": self.best_metric,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
            "config": self.config,
            "routing_history": list(self.tracker.history) if self.tracker is not None else [],
            "rng": rng_states if rng_states is not None else [self.capture_rng_state()],
            "loader": {"next_epoch": epoch + 1, "seed": self.seed},  # the sampler's epoch, set_loader_epoch's seed
        }

    def capture_rng_state(self) -> dict[str, Any]:
        """This process's random states: the global ones
        (:func:`~convmoe.engine.checkpoint.capture_rng_state`) and the training loader's generator.

        Example:
            >>> sorted(trainer.capture_rng_state())  # doctest: +SKIP
            ['cuda', 'loader_generator', 'numpy', 'python', 'torch']
        """
        generator = self.train_loader.generator
        return {**capture_rng_state(), "loader_generator": generator.get_state() if generator is not None else None}

    def load_state_dict(self, state: Mapping[str, Any], source: str | Path | None = None) -> None:
        """Restore a :meth:`state_dict`; training continues with the next epoch, as the uninterrupted
        run would have.

        Args:
            state: A :meth:`state_dict`, e.g. from :func:`~convmoe.engine.checkpoint.load_checkpoint`.
            source: The checkpoint's path, named in errors.

        Raises:
            ValueError: The model, optimizer or schedulers differ from the checkpoint's, or a
                fixed-length schedule ends before ``max_epochs``; the message names the fix.
        """
        where = f"checkpoint {source}" if source is not None else "the checkpoint"
        saved_config = state.get("config") if isinstance(state.get("config"), Mapping) else {}
        self._load_model_state(state["model"], where, saved_config)
        self._load_optimizer_state(state["optimizer"], where, saved_config)
        if len(state["schedulers"]) != len(self.schedulers):
            raise ValueError(f"{where} has {len(state['schedulers'])} schedulers, the config "
                             f"{len(self.schedulers)}; resume with the config it was trained with.")
        for scheduled, scheduler_state in zip(self.schedulers, state["schedulers"], strict=True):
            scheduled.scheduler.load_state_dict(scheduler_state)
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        self.best_metric = state["best_metric"]
        self._check_schedule_lengths(where, saved_config)
        if self.tracker is not None:  # the curves go on from the resumed epoch
            self.tracker.history = [row for row in state.get("routing_history", []) if row["epoch"] < self.start_epoch]
        self._restore_rng(state, where)

    def _load_model_state(self, saved: Mapping[str, Any], where: str, saved_config: Mapping[str, Any]) -> None:
        model = unwrap_model(self.model)
        current = model.state_dict()
        problems = []
        shapes = [f"{k!r} (checkpoint {tuple(saved[k].shape)}, model {tuple(v.shape)})" for k, v in current.items()
                  if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != v.shape]
        missing = [repr(k) for k in current if k not in saved]
        unexpected = [repr(k) for k in saved if k not in current]
        for label, names in (("shapes differ at", shapes), ("missing", missing), ("unexpected", unexpected)):
            if names:
                problems.append(f"{label} {_first_few(names)}")
        if not problems:
            model.load_state_dict(saved)
            return
        changed = (_config_differences(saved_config["model"], self.config.get("model"), "model")
                   if "model" in saved_config else [])
        hint = f"; the config differs from the checkpoint's at {_first_few(changed)}" if changed else ""
        raise ValueError(f"{where} does not match the model: {'; '.join(problems)}{hint}; resume with the config "
                         "the run was trained with, or start a new run (a new trainer.default_root_dir).")

    def _load_optimizer_state(self, saved: Mapping[str, Any], where: str, saved_config: Mapping[str, Any]) -> None:
        fix = "resume with the config the run was trained with, or start a new run (a new trainer.default_root_dir)."
        saved_target = (saved_config.get("optimizer") or {}).get("_target_")
        target = (self.config.get("optimizer") or {}).get("_target_")
        if saved_target and target and saved_target != target:
            raise ValueError(f"{where} was trained with optimizer {saved_target}, the config builds {target}; {fix}")
        try:
            self.optimizer.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as error:
            reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise ValueError(f"{where}'s optimizer state does not fit the optimizer ({reason}); {fix}") from error

    def _restore_rng(self, state: Mapping[str, Any], where: str) -> None:
        """Restore this process's RNG states and the loader's generator (a no-op for old checkpoints)."""
        rng = state.get("rng")
        if not rng:
            warnings.warn(f"{where} has no RNG states (written by an older convmoe); training resumes, but the data "
                          "order and random streams differ from the uninterrupted run's, so the continuation is not "
                          "exact.", UserWarning, stacklevel=3)
            return
        if len(rng) != self.ctx.world_size:
            warnings.warn(f"{where} holds the RNG states of {len(rng)} processes, this run has "
                          f"{self.ctx.world_size}; the random streams restart, so the continuation is not exact.",
                          UserWarning, stacklevel=3)
            return
        restore_rng_state(rng[self.ctx.rank])
        generator, saved = self.train_loader.generator, rng[self.ctx.rank].get("loader_generator")
        if generator is not None and saved is not None:
            generator.set_state(saved.cpu())

    def _resume_path(self) -> Path | None:
        if self.settings.resume is None:
            return None
        if self.settings.resume == "auto":
            path = self.checkpoint_dir / "last.pt"
            return path if path.is_file() else None
        return Path(self.settings.resume)

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train for ``max_epochs`` (from the resumed epoch), validating and checkpointing each epoch.

        Returns:
            The best metric, checkpoint paths, per-epoch history and test metrics.
        """
        resume = self._resume_path()
        if resume is not None:
            self.load_state_dict(load_checkpoint(resume, map_location=self.ctx.device), source=resume)
        main = self.ctx.is_main
        csv_logger = CSVLogger(self.output_dir / "metrics.csv", keep_until_epoch=self.start_epoch) if main else None
        tensorboard = TensorBoardLogger(self.output_dir / "tensorboard") if main else None
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        history: list[dict[str, Any]] = []
        try:
            for epoch in range(self.start_epoch, self.settings.max_epochs):
                row = {"epoch": epoch, **self.train_epoch(epoch, tensorboard)}
                last = epoch == self.settings.max_epochs - 1
                if self.val_loader is not None and ((epoch + 1) % self.settings.check_val_every_n_epoch == 0 or last):
                    row.update({f"val/{k}": v for k, v in self.validate().items()})
                self._step_schedulers("epoch", row, epoch)
                row["step"] = self.global_step
                improved = self._update_best(row)
                # Every process's random states, taken where the resumed run will restore them.
                rng_states = all_gather_objects(self.capture_rng_state()) if self.ctx.distributed else None
                if main:
                    self._save(epoch, row, improved, rng_states)
                    csv_logger.log(row)
                    tensorboard.log(row, step=epoch)
                    self._print_epoch(row)
                    self._save_routing_history()
                barrier()
                history.append(row)
            test_metrics = self._test(csv_logger, tensorboard)
        finally:
            if tensorboard is not None:
                tensorboard.close()
        best = self.checkpoint_dir / "best.pt"
        last = self.checkpoint_dir / "last.pt"
        return TrainResult(self.output_dir, self.monitor, self.best_metric, best if best.is_file() else None,
                           last if last.is_file() else None, history, test_metrics)

    def train_epoch(self, epoch: int, tensorboard: TensorBoardLogger | None = None) -> dict[str, float]:
        """One epoch of training; returns ``train/loss``, ``train/task_loss``, ``train/aux_loss``, ``lr``,
        the routing statistics (``routing/train_*``, ``extra/train_medoe_*``) and the epoch's duration."""
        model, settings, device = self.model, self.settings, self.ctx.device
        model.train()
        self.set_loader_epoch(epoch)
        totals = torch.zeros(4, dtype=torch.float64)  # loss, task loss, aux loss, samples
        routing_sums: dict[str, float] = {}
        routing_count = 0
        start = time.perf_counter()
        accumulate = settings.accumulate_grad_batches
        bar = tqdm(self.train_loader, total=self.train_batches, desc=f"epoch {epoch}", dynamic_ncols=True,
                   disable=not (self.ctx.is_main and settings.enable_progress_bar))
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            if i >= self.train_batches:
                break
            inputs, target = split_batch(batch)
            inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
            boundary = (i + 1) % accumulate == 0 or i + 1 == self.train_batches
            sync = contextlib.nullcontext() if boundary or not self.ctx.distributed else model.no_sync()
            with sync:
                with autocast(device, self.precision):
                    task_loss = self.loss_fn(model_output(model(inputs)), target)
                aux = convmoe.aux_loss(model)  # the MoE blocks' balancing losses, weighted by their configs
                loss = task_loss.float() + aux
                self.scaler.scale(loss / accumulate).backward()
            if boundary:
                self._optimizer_step()
                if tensorboard is not None and self.global_step % settings.log_every_n_steps == 0:
                    tensorboard.log({"train/loss_step": loss.item(), "lr": self._lr()}, step=self.global_step)
            if i % settings.routing_stats_every_n_steps == 0:
                if self.tracker is not None:  # soft targets (mixup) carry no class: balance only
                    self.tracker.update(model, target if not target.is_floating_point() else None)
                summary = convmoe.routing_stats(model).summary()
                for key, value in summary.items():
                    routing_sums[key] = routing_sums.get(key, 0.0) + float(value)
                routing_count += bool(summary)
            n, loss_value = inputs.shape[0], loss.item()
            totals += torch.tensor([loss_value * n, task_loss.item() * n, aux.item() * n, n], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        totals = all_reduce_sum(totals.to(device)).cpu() if self.ctx.distributed else totals
        samples = max(float(totals[3]), 1.0)
        row = {"train/loss": float(totals[0]) / samples, "train/task_loss": float(totals[1]) / samples,
               "train/aux_loss": float(totals[2]) / samples, "lr": self._lr(),
               "time/epoch_s": time.perf_counter() - start}
        for key, value in routing_sums.items():
            prefix = "extra/train_" if key.startswith("medoe_") else "routing/train_"
            row[prefix + key] = value / routing_count
        if self.tracker is not None:
            row.update(self.tracker.epoch_end(epoch, reduce=all_reduce_sum if self.ctx.distributed else None))
        return row

    def _optimizer_step(self) -> None:
        if self.settings.gradient_clip_val is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.gradient_clip_val)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self._step_schedulers("step", {}, self.global_step)

    def _step_schedulers(self, interval: str, metrics: Mapping[str, Any], count: int) -> None:
        for scheduled in self.schedulers:
            if scheduled.interval != interval:
                continue
            if interval == "epoch" and (count + 1) % scheduled.frequency:
                continue
            if interval == "step" and count % scheduled.frequency:
                continue
            if isinstance(scheduled.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                key = scheduled.monitor or self.monitor
                if key not in metrics:
                    raise ValueError(f"ReduceLROnPlateau monitors {key!r}, which this epoch did not log; set the "
                                     "scheduler's monitor to a logged metric and interval to 'epoch'.")
                scheduled.scheduler.step(metrics[key])
            else:
                scheduled.scheduler.step()

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def validate(self, loader: DataLoader | None = None, description: str = "val") -> dict[str, float]:
        """Metrics and loss on the validation loader (or ``loader``), summed over processes."""
        loader = loader if loader is not None else self.val_loader
        if self.ctx.distributed:
            broadcast_buffers(unwrap_model(self.model))  # every process evaluates rank 0's (saved) statistics
        max_batches = limit_batches(self.settings.limit_val_batches, len(loader))
        sync = (lambda metric: metric.sync(self.ctx.device)) if self.ctx.distributed else None
        # The bare model: a DDP forward may start a buffer broadcast, and processes can hold different
        # numbers of evaluation batches (ShardSampler does not pad), which would hang.
        return run_evaluation(unwrap_model(self.model), loader, self.ctx.device, task=self.task, loss_fn=self.loss_fn,
                              precision=self.precision, ignore_index=self.ignore_index, class_names=self.class_names,
                              max_batches=max_batches, progress=self.ctx.is_main and self.settings.enable_progress_bar,
                              sync=sync, description=description)

    def _update_best(self, row: Mapping[str, Any]) -> bool:
        value = row.get(self.monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.best_metric is None or self.better(value, self.best_metric):
            self.best_metric = float(value)
            return True
        return False

    def _save(self, epoch: int, row: Mapping[str, Any], improved: bool,
              rng_states: list[dict[str, Any]] | None = None) -> None:
        state = self.state_dict(epoch, row, rng_states)
        save_checkpoint(self.checkpoint_dir / "last.pt", state)
        if improved:
            save_checkpoint(self.checkpoint_dir / "best.pt", state)

    def _save_routing_history(self) -> None:
        """``routing_history.json`` and, with matplotlib, ``routing_curves.png`` in the output folder."""
        if self.tracker is None:
            return
        self.tracker.save(self.output_dir / "routing_history.json")
        # Without matplotlib the JSON history is still complete; convmoe.analysis.plot_tracking draws it later.
        with contextlib.suppress(ImportError):
            self.tracker.plot(self.output_dir / "routing_curves.png")

    def _print_epoch(self, row: Mapping[str, Any]) -> None:
        shown = {k: v for k, v in row.items() if not k.startswith("val/iou/") and not k.startswith("routing/")}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
        stats = convmoe.routing_stats(self.model)
        if stats.blocks:
            print(stats.table())

    def _test(self, csv_logger: CSVLogger | None, tensorboard: TensorBoardLogger | None) -> dict[str, float]:
        if not self.config.get("test_dataset"):
            return {}
        best = self.checkpoint_dir / "best.pt"
        barrier()
        if best.is_file():
            unwrap_model(self.model).load_state_dict(load_checkpoint(best, map_location=self.ctx.device)["model"])
        loader = build_dataloader(self.config["test_dataset"], self.config.get("data_loader") or {}, self.ctx, False)
        metrics = {f"test/{k}": v for k, v in self.validate(loader, "test").items()}
        if csv_logger is not None:
            csv_logger.log({"epoch": self.settings.max_epochs - 1, "step": self.global_step, **metrics})
            tensorboard.log(metrics, step=self.settings.max_epochs - 1)
            print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/iou/" not in k))
        return metrics


def _trainer_section(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    config = config or {}
    return config.get("trainer") or config.get("pl_trainer") or {}


def _first_few(names: Sequence[str], shown: int = 3) -> str:
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _config_differences(saved: Any, current: Any, prefix: str) -> list[str]:
    """Dotted keys where two config sections differ, with both values (``a.b (4 -> 2)``)."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        return [difference for key in sorted(set(saved) | set(current), key=str)
                for difference in _config_differences(saved.get(key), current.get(key), f"{prefix}.{key}")]
    return [] if saved == current else [f"{prefix} ({saved!r} -> {current!r})"]


def train(config: Mapping[str, Any] | str | Path, overrides: Sequence[str] = ()) -> TrainResult:
    """Train from a config (a YAML path or a dict) with ``key=value`` overrides: ``convmoe train`` as a function.

    Example:
        >>> result = train("configs/cifar10_efficientnet_lite0_moe.yaml", ["trainer.max_epochs=1"])  # doctest: +SKIP
        >>> result.best_metric  # doctest: +SKIP
    """
    return Trainer(config, overrides).fit()
