"""Datasets and loaders from config nodes, with a training order that is a function of (seed, epoch)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from convmoe.engine.config import instantiate
from convmoe.engine.evaluation_loader import EvaluationLoader
from convmoe.engine.processes import DistributedContext, ShardSampler


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


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of a training loader's generator in ``epoch``: its shuffle order and worker seeds.

    A function of the run's seed, the epoch and the process only (not of what ran before), so a
    resumed run draws the order the uninterrupted one did.

    Example:
        >>> epoch_seed(0, 1) == epoch_seed(0, 1) != epoch_seed(1, 0)
        True
    """
    return _hashed_seed(f"convmoe-loader/{seed}/{epoch}/{rank}")


def evaluation_seed(seed: int, rank: int = 0) -> int:
    """The seed every pass of an evaluation loader starts from: a stream apart from every training epoch's
    (:func:`epoch_seed`), so evaluating the training split never draws a training epoch's views.

    Example:
        >>> evaluation_seed(0) == evaluation_seed(0) != evaluation_seed(0, rank=1)
        True
        >>> evaluation_seed(0) != epoch_seed(0, 0)
        True
    """
    return _hashed_seed(f"convmoe-eval-loader/{seed}/{rank}")


def _hashed_seed(text: str) -> int:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid manual_seed


def _drop_settings_that_mean_nothing(settings: dict[str, Any], ctx: DistributedContext) -> None:
    """A recipe written for a GPU with workers runs as it is on a CPU or with ``num_workers=0``: pinned memory
    (no accelerator to copy to; torch warns at every loader) and the workers' own settings (torch refuses
    them without workers) are dropped."""
    if ctx.device.type != "cuda":
        settings.pop("pin_memory", None)
    if not settings.get("num_workers"):
        for key in ("persistent_workers", "prefetch_factor"):
            settings.pop(key, None)


def build_dataloader(node: Any, defaults: Mapping[str, Any], ctx: DistributedContext, train: bool,
                     seed: int = 0) -> DataLoader:
    """A DataLoader for a dataset node: a ``_target_`` mapping or a list of them (concatenated).

    Loader settings are the config's top-level ``data_loader`` updated by the node's own
    ``data_loader``. An evaluation loader (``train=False``) reads every sample once, in order: it
    ignores ``shuffle`` and ``drop_last``, which a ``train_dataset`` node evaluated by ``convmoe eval
    --split train`` carries. Under torchrun, training shards with ``DistributedSampler`` (shuffled when
    ``shuffle`` is set) and evaluation with :class:`~convmoe.engine.processes.ShardSampler`.
    A training loader draws its order and worker seeds from a generator seeded with
    :func:`epoch_seed` ``(seed, 0, rank)``; :meth:`~convmoe.engine.trainer.Trainer.set_loader_epoch` reseeds it each epoch.
    An evaluation loader is an :class:`~convmoe.engine.evaluation_loader.EvaluationLoader`: every pass draws
    the same random numbers, from :func:`evaluation_seed` ``(seed, rank)``.

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
    _drop_settings_that_mean_nothing(settings, ctx)
    dataset = build_dataset(node)
    shuffle = bool(settings.pop("shuffle", train))
    if not train:
        settings.update(drop_last=False)
        if ctx.distributed:
            settings.update(sampler=ShardSampler(dataset, ctx.rank, ctx.world_size))
        return EvaluationLoader(dataset, seed=evaluation_seed(seed, ctx.rank), **settings)
    generator = torch.Generator().manual_seed(epoch_seed(seed, 0, ctx.rank))
    if ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed)
        return DataLoader(dataset, sampler=sampler, generator=generator, **settings)
    return DataLoader(dataset, shuffle=shuffle, generator=generator, **settings)
