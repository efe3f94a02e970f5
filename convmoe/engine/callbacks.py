"""Callbacks: code from a floor above the engine that runs inside its loop (Lightning's ``Callback``).

The engine knows nothing of :mod:`convmoe.analysis`; a routing tracker reaches the loop as a
callback instead, as Lightning's ``Trainer(callbacks=[...])`` takes one::

    Trainer(config, callbacks=[MyCallback()]).fit()

``trainer.track_routing`` (on by default) adds the class named by ``trainer.routing_tracker``,
:class:`convmoe.analysis.RoutingTrackerCallback`. Every hook runs on every process unless it says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the trainer imports this module
    from torch import Tensor

    from convmoe.engine.trainer import Trainer


class Callback:
    """Hooks the trainer calls; each does nothing here, override the ones you need.

    Example:
        >>> class Count(Callback):
        ...     def __init__(self):
        ...         self.batches = 0
        ...     def on_train_batch_end(self, trainer, target, batch_index):
        ...         self.batches += 1
        >>> Count().on_train_epoch_end(None, 0)
        {}
    """

    def setup(self, trainer: Trainer) -> None:
        """Once, at the end of ``Trainer.__init__``: the model, loaders and settings are built."""

    def on_train_batch_end(self, trainer: Trainer, target: Tensor, batch_index: int) -> None:
        """After each training batch's forward and backward; ``target`` is the batch's labels (on the device)."""

    def on_train_epoch_end(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        """After an epoch's training batches (before validation); returns metrics for the epoch's row."""
        return {}

    def on_save_checkpoint(self, trainer: Trainer, checkpoint: MutableMapping[str, Any]) -> None:
        """Add this callback's state to ``checkpoint`` (a :meth:`Trainer.state_dict`)."""

    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        """Restore from a resumed ``checkpoint``; ``trainer.start_epoch`` is already the next epoch."""

    def on_epoch_saved(self, trainer: Trainer, epoch: int) -> None:
        """On the main process only, after the epoch's checkpoint and metrics were written: write files."""
