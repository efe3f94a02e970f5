"""One training epoch: the batches, the optimizer steps, and the epoch's averaged losses and routing statistics."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

import convmoe
from convmoe.distributed import global_batch
from convmoe.engine.evaluate import autocast, batch_to, model_output, split_batch
from convmoe.engine.logging import TensorBoardLogger
from convmoe.engine.metrics import check_output_fits_target
from convmoe.engine.processes import all_reduce_sum
from convmoe.engine.schedules import step_schedulers
from convmoe.progress import progress_bar

if TYPE_CHECKING:  # the trainer imports this module
    from convmoe.engine.trainer import Trainer


def train_epoch(trainer: Trainer, epoch: int, tensorboard: TensorBoardLogger | None = None) -> dict[str, float]:
    """One epoch of ``trainer``'s training; see :meth:`Trainer.train_epoch <convmoe.engine.Trainer.train_epoch>`."""
    model, settings, device = trainer.model, trainer.settings, trainer.ctx.device
    model.train()
    trainer.set_loader_epoch(epoch)
    totals = torch.zeros(4, dtype=torch.float64)  # loss, task loss, aux loss, samples
    routing_sums: dict[str, float] = {}
    routing_count = 0
    start = time.perf_counter()
    accumulate = settings.accumulate_grad_batches
    bar = progress_bar(trainer.train_loader, description=f"epoch {epoch}", total=trainer.train_batches, leave=True,
                       enabled=trainer.ctx.is_main and settings.enable_progress_bar)
    trainer.optimizer.zero_grad(set_to_none=True)
    window = contextlib.ExitStack()  # the global-batch switch loss counts over one optimizer step's micro-batches
    for i, batch in enumerate(bar):
        if i >= trainer.train_batches:
            break
        if i % accumulate == 0:
            window.enter_context(global_batch(model))
        inputs, target = batch_to(*split_batch(batch), device, trainer.memory_format)
        boundary = (i + 1) % accumulate == 0 or i + 1 == trainer.train_batches
        sync = contextlib.nullcontext() if boundary or not trainer.ctx.distributed else model.no_sync()
        with sync:
            with autocast(device, trainer.precision):
                output = model_output(model(inputs))
                if i == 0:  # the task's shapes; the labels are the loss's business (it knows what it ignores)
                    check_output_fits_target(output, target, check_labels=False)
                task_loss = trainer.loss_fn(output, target)
            aux = convmoe.aux_loss(model)  # the MoE blocks' balancing losses, weighted by their configs
            loss = task_loss.float() + aux
            trainer.scaler.scale(loss / accumulate).backward()
        if boundary:
            window.close()
            _optimizer_step(trainer)
            if tensorboard is not None and trainer.global_step % settings.log_every_n_steps == 0:
                tensorboard.log({"train/loss_step": loss.item(), "lr": _lr(trainer)}, step=trainer.global_step)
        for callback in trainer.callbacks:
            callback.on_train_batch_end(trainer, target, i)
        if i % settings.routing_stats_every_n_steps == 0:
            summary = convmoe.routing_stats(model).summary()
            for key, value in summary.items():
                routing_sums[key] = routing_sums.get(key, 0.0) + float(value)
            routing_count += bool(summary)
        n, loss_value = inputs.shape[0], loss.item()
        totals += torch.tensor([loss_value * n, task_loss.item() * n, aux.item() * n, n], dtype=torch.float64)
        bar.set_postfix(loss=f"{loss_value:.4f}")
    window.close()
    totals = all_reduce_sum(totals.to(device)).cpu() if trainer.ctx.distributed else totals
    samples = max(float(totals[3]), 1.0)
    row = {"train/loss": float(totals[0]) / samples, "train/task_loss": float(totals[1]) / samples,
           "train/aux_loss": float(totals[2]) / samples, "lr": _lr(trainer),
           "time/epoch_s": time.perf_counter() - start}
    for key, value in routing_sums.items():
        prefix = "extra/train_" if key.startswith("medoe_") else "routing/train_"
        row[prefix + key] = value / routing_count
    for callback in trainer.callbacks:
        row.update(callback.on_train_epoch_end(trainer, epoch))
    return row


def _optimizer_step(trainer: Trainer) -> None:
    if trainer.settings.gradient_clip_val is not None:
        trainer.scaler.unscale_(trainer.optimizer)
        nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.settings.gradient_clip_val)
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.global_step += 1
    step_schedulers(trainer.schedulers, "step", {}, trainer.global_step, trainer.monitor)


def _lr(trainer: Trainer) -> float:
    return float(trainer.optimizer.param_groups[0]["lr"])
