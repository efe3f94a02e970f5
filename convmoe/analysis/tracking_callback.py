"""The engine's routing tracking: a :class:`RoutingTracker` run as a training callback.

The engine sits below analysis and never imports it; ``trainer.track_routing`` (on by default) adds
this callback by name (``trainer.routing_tracker``), or pass one yourself::

    Trainer(config, callbacks=[RoutingTrackerCallback()]).fit()
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from convmoe.analysis.layers import moe_layers
from convmoe.analysis.tracking import RoutingTracker
from convmoe.engine.callbacks import Callback
from convmoe.engine.processes import all_reduce_sum

if TYPE_CHECKING:
    from convmoe.engine.trainer import Trainer


class RoutingTrackerCallback(Callback):
    """Per-layer specialisation and balance each epoch: logged as ``routing/<layer>/<statistic>``,
    kept in the checkpoints (``routing_history``, so a resumed run's curves go on), written to
    ``routing_history.json`` and, with matplotlib, plotted to ``routing_curves.png``.

    Batches are sampled like the engine's routing statistics (``trainer.routing_stats_every_n_steps``).
    Models without MoE blocks are not tracked.

    Example:
        >>> callback = RoutingTrackerCallback()
        >>> callback.tracker is None  # built by setup(trainer)
        True
    """

    def __init__(self) -> None:
        self.tracker: RoutingTracker | None = None

    def setup(self, trainer: Trainer) -> None:
        if next(moe_layers(trainer.model), None) is None:
            return
        num_classes = len(trainer.class_names) if trainer.class_names else None
        if trainer.ctx.distributed and num_classes is None:
            warnings.warn("routing tracking is off: under torchrun it needs the number of classes, and the datasets "
                          "have no 'classes' attribute.", UserWarning, stacklevel=3)
            return
        self.tracker = RoutingTracker(ignore_index=trainer.ignore_index, num_classes=num_classes).attach(trainer.model)

    def on_train_batch_end(self, trainer: Trainer, target: Tensor, batch_index: int) -> None:
        if self.tracker is not None and batch_index % trainer.settings.routing_stats_every_n_steps == 0:
            # soft targets (mixup) carry no class: balance only
            self.tracker.update(trainer.model, target if not target.is_floating_point() else None)

    def on_train_epoch_end(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        if self.tracker is None:
            return {}
        return self.tracker.epoch_end(epoch, reduce=all_reduce_sum if trainer.ctx.distributed else None)

    def on_save_checkpoint(self, trainer: Trainer, checkpoint: MutableMapping[str, Any]) -> None:
        checkpoint["routing_history"] = list(self.tracker.history) if self.tracker is not None else []

    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        if self.tracker is not None:  # the curves go on from the resumed epoch
            self.tracker.history = [row for row in checkpoint.get("routing_history", [])
                                    if row["epoch"] < trainer.start_epoch]

    def on_epoch_saved(self, trainer: Trainer, epoch: int) -> None:
        if self.tracker is None:
            return
        self.tracker.save(trainer.output_dir / "routing_history.json")
        # Without matplotlib the JSON history is still complete; convmoe.analysis.plot_tracking draws it later.
        with contextlib.suppress(ImportError):
            self.tracker.plot(trainer.output_dir / "routing_curves.png")
