"""Learning-rate schedulers of a run: built from the config, stepped per epoch or step, checked for length."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from convmoe.engine.config import instantiate, locate


@dataclass
class ScheduledLR:
    """A learning-rate scheduler and when it steps (Lightning's ``interval`` and ``frequency``)."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None


def _fill_total_steps(node: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    # Schedulers such as OneCycleLR need the run's length; fill it when the config leaves it out.
    node = dict(node)
    target = locate(node["_target_"])
    parameters = inspect.signature(target).parameters
    if "total_steps" in parameters and node.get("total_steps") is None:
        node["total_steps"] = total_steps
    return node


def build_schedulers(config: Mapping[str, Any], optimizer: torch.optim.Optimizer, max_epochs: int,
                     steps_per_epoch: int) -> list[ScheduledLR]:
    """The config's ``scheduler_list`` and ``scheduler`` entries on ``optimizer``, ``total_steps`` filled in."""
    entries = list(config.get("scheduler_list") or [])
    if config.get("scheduler") is not None:
        entries.append(config["scheduler"])
    schedulers = []
    for entry in entries:
        spec = dict(entry) if "scheduler" in entry else {"scheduler": entry}
        interval = spec.get("interval", "epoch")
        if interval not in ("epoch", "step"):
            raise ValueError(f"scheduler interval={interval!r} must be 'epoch' or 'step'.")
        total = max_epochs * (steps_per_epoch if interval == "step" else 1)
        node = _fill_total_steps(spec["scheduler"], total)
        schedulers.append(ScheduledLR(instantiate(node, optimizer=optimizer), interval,
                                      int(spec.get("frequency", 1)), spec.get("monitor")))
    return schedulers


def step_schedulers(schedulers: Sequence[ScheduledLR], interval: str, metrics: Mapping[str, Any], count: int,
                    monitor: str) -> None:
    """Step the schedulers of ``interval`` due at ``count`` (epoch or optimizer step); ``monitor`` feeds
    ReduceLROnPlateau when its entry names none."""
    for scheduled in schedulers:
        if scheduled.interval != interval:
            continue
        if interval == "epoch" and (count + 1) % scheduled.frequency:
            continue
        if interval == "step" and count % scheduled.frequency:
            continue
        if isinstance(scheduled.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            key = scheduled.monitor or monitor
            if key not in metrics:
                raise ValueError(f"ReduceLROnPlateau monitors {key!r}, which this epoch did not log; set the "
                                 "scheduler's monitor to a logged metric and interval to 'epoch'.")
            scheduled.scheduler.step(metrics[key])
        else:
            scheduled.scheduler.step()


def _steps_at_end(scheduled: ScheduledLR, *, max_epochs: int, start_epoch: int, global_step: int,
                  steps_per_epoch: int) -> int:
    """The step count (``last_epoch``) ``scheduled`` reaches when the run ends at ``max_epochs``."""
    frequency, done = scheduled.frequency, scheduled.scheduler.last_epoch
    if scheduled.interval == "step":
        end = global_step + (max_epochs - start_epoch) * steps_per_epoch
        return done + max(end // frequency - global_step // frequency, 0)
    return done + max(max_epochs // frequency - start_epoch // frequency, 0)


def check_schedule_lengths(schedulers: Sequence[ScheduledLR], *, max_epochs: int, start_epoch: int,
                           global_step: int, steps_per_epoch: int, resumed: str | None = None,
                           original_max_epochs: int | None = None) -> None:
    """Fail now, not mid-epoch, where a fixed-length schedule (OneCycleLR's ``total_steps``) ends
    before ``max_epochs`` does; ``resumed`` names the checkpoint a resumed run loaded, and
    ``original_max_epochs`` is the ``max_epochs`` it was trained with."""
    for scheduled in schedulers:
        total = getattr(scheduled.scheduler, "total_steps", None)
        if not isinstance(total, int):
            continue
        needed = _steps_at_end(scheduled, max_epochs=max_epochs, start_epoch=start_epoch, global_step=global_step,
                               steps_per_epoch=steps_per_epoch)
        if needed <= total:
            continue
        name = type(scheduled.scheduler).__name__
        if resumed is None:
            per_epoch = f" x {steps_per_epoch} steps per epoch" if scheduled.interval == "step" else ""
            raise ValueError(f"the {name} schedule has total_steps={total}, but this run takes {needed} steps "
                             f"(max_epochs={max_epochs}{per_epoch}); raise total_steps, or leave it out to have "
                             "it filled from max_epochs.")
        fixed_by = (f" by the original max_epochs={original_max_epochs}" if original_max_epochs is not None
                    else " by the original run")
        raise ValueError(f"cannot resume {resumed} with trainer.max_epochs={max_epochs}: its {name} schedule was "
                         f"fixed at total_steps={total}{fixed_by}, and max_epochs={max_epochs} needs {needed} "
                         "steps; to train longer start a new run (a new trainer.default_root_dir), or use a "
                         "scheduler without a fixed length (e.g. CosineAnnealingLR).")
