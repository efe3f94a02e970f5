"""Evaluation loaders with random streams of their own: every pass draws the same numbers.

A dataset with random transforms (``convmoe eval --split train``, or a validation set with test-time
augmentation) then scores the same views on every pass, in every run with the same seed, and
never the views of a training epoch. Reading it leaves the global random streams as they were, so
validating does not change what training draws next, and a resumed run validates as the
uninterrupted one did.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from convmoe.engine.checkpoint import capture_rng_state, restore_rng_state


class EvaluationLoader(DataLoader):
    """A DataLoader whose every pass starts from ``seed``: the same worker seeds, and, without workers,
    the same draws in this process (torch, numpy and ``random``), whose own streams are left untouched.

    With ``persistent_workers=True`` the workers outlive a pass and keep their random state, so only
    their first pass is seeded: later passes draw on from there.

    Args:
        dataset: The dataset.
        seed: The seed of every pass (:func:`~convmoe.engine.loaders.evaluation_seed`).
        **settings: DataLoader arguments (no ``generator``: the loader owns it).

    Example:
        >>> loader = EvaluationLoader([0, 1, 2], seed=0, batch_size=2)
        >>> [batch.tolist() for batch in loader]
        [[0, 1], [2]]
    """

    def __init__(self, dataset: Dataset, *, seed: int, **settings: Any) -> None:
        super().__init__(dataset, generator=torch.Generator().manual_seed(seed), **settings)
        self.seed = seed

    def __iter__(self) -> Iterator[Any]:
        self.generator.manual_seed(self.seed)  # the workers' seeds are drawn from it
        batches = super().__iter__()
        return batches if self.num_workers > 0 else OwnRandomStreams(batches, self.seed)


class OwnRandomStreams:
    """An iterator whose ``next()`` runs with random states of its own (the states that
    :func:`~convmoe.engine.checkpoint.capture_rng_state` saves), seeded by ``seed``; the process's
    states are restored after each item.

    Example:
        >>> draws = OwnRandomStreams(iter(range(2)), seed=0)
        >>> state = torch.get_rng_state()
        >>> _ = next(draws)
        >>> torch.equal(torch.get_rng_state(), state)
        True
    """

    def __init__(self, items: Iterator[Any], seed: int) -> None:
        self.items = items
        outer = capture_rng_state()
        torch.default_generator.manual_seed(seed)  # the CPU stream only: torch.manual_seed would queue a CUDA seeding
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.states = capture_rng_state()
        restore_rng_state(outer)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        outer = capture_rng_state()
        restore_rng_state(self.states)
        try:
            return next(self.items)
        finally:
            self.states = capture_rng_state()
            restore_rng_state(outer)
