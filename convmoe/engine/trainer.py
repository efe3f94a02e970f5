"""The training loop: a config in, a trained model, checkpoints and logged metrics out.

    config (YAML)  -> model, loss, datasets + loaders, optimizer, schedulers     (_target_ instantiation)
    each epoch     -> train: autocast forward, task loss + convmoe.aux_loss(model), backward, step
                      routing statistics averaged over the epoch (MEDoE: extra/train_medoe_*)
                   -> validate: metrics summed over processes (exact under torchrun)
                   -> metrics.csv, TensorBoard, checkpoints/last.pt and best.pt (on the monitored metric)
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
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

import convmoe
from convmoe.engine.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from convmoe.engine.config import instantiate, load_config, locate
from convmoe.engine.distributed import (
    DistributedContext,
    ShardSampler,
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
        seed: Seed for the model's initialisation and the data order.

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


def build_dataset(node: Any) -> Dataset:
    """The dataset of a config's dataset node: a ``_target_`` mapping or a list of them (concatenated);
    each node's own ``data_loader`` settings are left to :func:`build_dataloader`.

    Example:
        >>> len(build_dataset([{"_target_": "builtins.list", "_args_": [[1, 2]], "data_loader": {"batch_size": 2}},
        ...                    {"_target_": "builtins.list", "_args_": [[3]]}]))
        3
    """
    nodes = node if isinstance(node, list) else [node]
    datasets = [instantiate({k: v for k, v in item.items() if k != "data_loader"}) for item in nodes]
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def build_dataloader(node: Any, defaults: Mapping[str, Any], ctx: DistributedContext, train: bool,
                     seed: int = 0) -> DataLoader:
    """A DataLoader for a dataset node: a ``_target_`` mapping or a list of them (concatenated).

    Loader settings are the config's top-level ``data_loader`` updated by the node's own
    ``data_loader``. Under torchrun, training shards with ``DistributedSampler`` (shuffled when
    ``shuffle`` is set) and evaluation with :class:`~convmoe.engine.distributed.ShardSampler`.

    Example:
        >>> ctx = DistributedContext(0, 0, 1, torch.device("cpu"))
        >>> node = {"_target_": "builtins.list", "_args_": [[1, 2, 3]], "data_loader": {"batch_size": 2}}
        >>> [batch.tolist() for batch in build_dataloader(node, {}, ctx, train=False)]
        [[1, 2], [3]]
    """
    nodes = node if isinstance(node, list) else [node]
    settings = dict(defaults)
    for item in nodes:
        settings.update(item.get("data_loader") or {})
    dataset = build_dataset(node)
    shuffle = bool(settings.pop("shuffle", train))
    if ctx.distributed:
        sampler = (DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed)
                   if train else ShardSampler(dataset, ctx.rank, ctx.world_size))
        return DataLoader(dataset, sampler=sampler, **settings)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, shuffle=shuffle, generator=generator if shuffle else None, **settings)


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
        seed = self.settings.seed or 0
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

    # ---- checkpoints --------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        """Where ``last.pt`` and ``best.pt`` go."""
        return self.output_dir / "checkpoints"

    def state_dict(self, epoch: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Everything needed to resume after ``epoch``."""
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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; training continues with the next epoch."""
        unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if len(state["schedulers"]) != len(self.schedulers):
            raise ValueError(f"the checkpoint has {len(state['schedulers'])} schedulers, the config "
                             f"{len(self.schedulers)}; resume with the config it was trained with.")
        for scheduled, scheduler_state in zip(self.schedulers, state["schedulers"], strict=True):
            scheduled.scheduler.load_state_dict(scheduler_state)
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        self.best_metric = state["best_metric"]
        if self.tracker is not None:  # the curves go on from the resumed epoch
            self.tracker.history = [row for row in state.get("routing_history", []) if row["epoch"] < self.start_epoch]

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
            self.load_state_dict(load_checkpoint(resume, map_location=self.ctx.device))
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
                if main:
                    self._save(epoch, row, improved)
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
        sampler = getattr(self.train_loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
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

    def _save(self, epoch: int, row: Mapping[str, Any], improved: bool) -> None:
        state = self.state_dict(epoch, row)
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


def train(config: Mapping[str, Any] | str | Path, overrides: Sequence[str] = ()) -> TrainResult:
    """Train from a config (a YAML path or a dict) with ``key=value`` overrides: ``convmoe train`` as a function.

    Example:
        >>> result = train("configs/cifar10_efficientnet_lite0_moe.yaml", ["trainer.max_epochs=1"])  # doctest: +SKIP
        >>> result.best_metric  # doctest: +SKIP
    """
    return Trainer(config, overrides).fit()
