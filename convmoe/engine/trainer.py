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

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

import convmoe
from convmoe.engine.callbacks import Callback
from convmoe.engine.checkpoint import capture_rng_state, load_checkpoint, save_checkpoint, unwrap_model
from convmoe.engine.config import instantiate, load_config, locate
from convmoe.engine.config_check import check_freeze, check_freeze_base
from convmoe.engine.epoch import train_epoch
from convmoe.engine.evaluate import (
    limit_batches,
    loss_ignore_index,
    resolve_precision,
    run_evaluation,
    split_batch,
)
from convmoe.engine.loaders import build_dataloader, epoch_seed
from convmoe.engine.logging import CSVLogger, TensorBoardLogger
from convmoe.engine.model_build import build_model
from convmoe.engine.processes import (
    all_gather_objects,
    barrier,
    broadcast_buffers,
    setup_distributed,
)
from convmoe.engine.resume import (
    load_model_state,
    load_optimizer_state,
    restore_rng,
    resume_path,
    trainer_section,
)
from convmoe.engine.schedules import build_schedulers, check_schedule_lengths, step_schedulers
from convmoe.engine.settings import TrainerSettings, TrainResult


class Trainer:
    """Train and validate a model described by a config; see the module docstring for the loop.

    Config sections: ``model``, ``loss``, ``optimizer`` (required); ``train_dataset`` (required),
    ``val_dataset``, ``test_dataset`` (each a ``_target_`` or a list, with ``data_loader``
    settings; a top-level ``data_loader`` gives defaults); ``scheduler`` or ``scheduler_list``;
    ``trainer`` (or ``pl_trainer``, see :class:`TrainerSettings`); ``freeze_base`` (train only the
    MoE experts and routers and the named modules, see :func:`convmoe.freeze_base`); ``freeze`` (freeze
    the named modules of a dense or MoE model, see :func:`convmoe.freeze_modules`); ``task``
    (``classification``/``segmentation``/``auto``); ``ignore_index`` (default: the loss's);
    ``init_encoder_from`` (a ``_target_`` giving a backbone whose weights go to an smp encoder); ``init_from``
    (every weight of a trained model instead, see :func:`~convmoe.engine.model_build.load_initial_weights`);
    ``patch`` (:func:`convmoe.patch` on the model after those weights are loaded, see
    :func:`~convmoe.engine.config_check.check_patch`).

    Args:
        config: A config dict or a YAML path.
        overrides: ``key=value`` overrides.
        callbacks: :class:`~convmoe.engine.callbacks.Callback` objects whose hooks run in the loop; with
            ``trainer.track_routing`` the ``trainer.routing_tracker`` class is added unless one is given.

    Example:
        >>> trainer = Trainer("configs/camvid_upernet_moe.yaml", ["trainer.max_epochs=1"])  # doctest: +SKIP
        >>> result = trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, config: Mapping[str, Any] | str | Path, overrides: Sequence[str] = (),
                 callbacks: Sequence[Callback] = ()) -> None:
        self.config = load_config(config, overrides)
        for key in ("model", "loss", "optimizer", "train_dataset"):
            if key not in self.config:
                raise ValueError(f"the config has no {key!r} section; a training config needs model, loss, optimizer "
                                 "and train_dataset.")
        self.settings = TrainerSettings.from_config(self.config)
        freeze = check_freeze_base(self.config.get("freeze_base"))
        frozen_modules = check_freeze(self.config.get("freeze"))
        self.ctx = setup_distributed(self.settings.accelerator)
        self.precision = resolve_precision(self.settings.precision, self.ctx.device)
        self.output_dir = Path(self.settings.default_root_dir)
        self.task = self.config.get("task", "auto")
        self.seed = seed = self.settings.seed or 0
        torch.manual_seed(seed)

        # The model section, init_from or init_encoder_from, then the patch section; a run that resumes gets every
        # weight from its checkpoint, so it builds the architecture only (no download, no init_from source).
        self._awaiting_checkpoint = resume_path(self.settings.resume, self.checkpoint_dir)
        model = build_model(self.config, pretrained=self._awaiting_checkpoint is None)
        if self.ctx.distributed and self.settings.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if freeze is not None:
            # After SyncBatchNorm (it drops the norms' hooks), before DDP and the optimizer (both read requires_grad).
            summary = convmoe.freeze_base(model, **freeze)
            if self.ctx.is_main:
                print(f"freeze_base: {summary}")
        if frozen_modules is not None:
            summary = convmoe.freeze_modules(model, **frozen_modules)
            if self.ctx.is_main:
                print(f"freeze: {summary}")
        self.memory_format = torch.channels_last if self.settings.channels_last else torch.preserve_format
        self.model = model.to(self.ctx.device, memory_format=self.memory_format)
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
        self.schedulers = build_schedulers(self.config, self.optimizer, self.settings.max_epochs, self.steps_per_epoch)
        use_scaler = self.precision == "16-mixed" and self.ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=use_scaler)

        self.monitor = self.settings.monitor or self._default_monitor()
        mode = self.settings.monitor_mode or ("min" if self.monitor.endswith("loss") else "max")
        self.better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
        self.start_epoch, self.global_step, self.best_metric = 0, 0, None
        self._check_schedule_lengths()
        self.callbacks = self._with_routing_tracker(list(callbacks))
        for callback in self.callbacks:
            callback.setup(self)
        torch.manual_seed(seed + self.ctx.rank)  # routing noise and expert dropout differ between processes

    # ---- construction helpers ----------------------------------------------------------------

    def _default_monitor(self) -> str:
        if self.val_loader is None:
            return "train/loss"
        task = self.task
        if task == "auto":
            dataset = self.val_loader.dataset  # one sample, without starting the loader's workers
            _, target = split_batch(next(iter(dataset)) if isinstance(dataset, IterableDataset) else dataset[0])
            task = "segmentation" if torch.as_tensor(target).dim() >= 2 else "classification"
        return "val/miou" if task == "segmentation" else "val/top1"

    def _with_routing_tracker(self, callbacks: list[Callback]) -> list[Callback]:
        """``callbacks`` and, with ``track_routing``, an instance of ``routing_tracker`` unless one is there."""
        if not self.settings.track_routing:
            return callbacks
        tracker = locate(self.settings.routing_tracker)
        if not (isinstance(tracker, type) and issubclass(tracker, Callback)):
            raise TypeError(f"trainer.routing_tracker={self.settings.routing_tracker!r} is not a "
                             "convmoe.engine.callbacks.Callback subclass; name one, or set trainer.track_routing=false.")
        if any(isinstance(callback, tracker) for callback in callbacks):
            return callbacks
        return [*callbacks, tracker()]

    def _check_schedule_lengths(self, resumed: str | None = None, saved_config: Mapping[str, Any] | None = None) -> None:
        check_schedule_lengths(self.schedulers, max_epochs=self.settings.max_epochs, start_epoch=self.start_epoch,
                               global_step=self.global_step, steps_per_epoch=self.steps_per_epoch, resumed=resumed,
                               original_max_epochs=trainer_section(saved_config).get("max_epochs"))

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
        checkpoint = {
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
            "rng": rng_states if rng_states is not None else [self.capture_rng_state()],
            "loader": {"next_epoch": epoch + 1, "seed": self.seed},  # the sampler's epoch, set_loader_epoch's seed
        }
        for callback in self.callbacks:
            callback.on_save_checkpoint(self, checkpoint)
        return checkpoint

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
        load_model_state(unwrap_model(self.model), state["model"], where, saved_config, self.config)
        load_optimizer_state(self.optimizer, state["optimizer"], where, saved_config, self.config)
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
        for callback in self.callbacks:
            callback.on_load_checkpoint(self, state)
        restore_rng(state, where, self.ctx.rank, self.ctx.world_size, self.train_loader.generator)

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train for ``max_epochs`` (from the resumed epoch), validating and checkpointing each epoch.

        Returns:
            The best metric, checkpoint paths, per-epoch history and test metrics.
        """
        resume = resume_path(self.settings.resume, self.checkpoint_dir)
        if resume is None and self._awaiting_checkpoint is not None:
            raise FileNotFoundError(f"this Trainer was built to resume from {self._awaiting_checkpoint}, which no longer "
                                    "exists; its model has the architecture's fresh weights only, so build a new Trainer")
        if resume is not None:
            self.load_state_dict(load_checkpoint(resume, map_location=self.ctx.device), source=resume)
            self._awaiting_checkpoint = None
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
                    for callback in self.callbacks:
                        callback.on_epoch_saved(self, epoch)
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
        return train_epoch(self, epoch, tensorboard)

    def _step_schedulers(self, interval: str, metrics: Mapping[str, Any], count: int) -> None:
        step_schedulers(self.schedulers, interval, metrics, count, self.monitor)

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
                              sync=sync, description=description, memory_format=self.memory_format)

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


def train(config: Mapping[str, Any] | str | Path, overrides: Sequence[str] = (),
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train from a config (a YAML path or a dict) with ``key=value`` overrides: ``convmoe train`` as a function.

    Example:
        >>> result = train("configs/cifar10_efficientnet_lite0_moe.yaml", ["trainer.max_epochs=1"])  # doctest: +SKIP
        >>> result.best_metric  # doctest: +SKIP
    """
    return Trainer(config, overrides, callbacks).fit()
