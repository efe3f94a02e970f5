"""Multi-process training under ``torchrun``: process group, devices, samplers and reductions.

Not :mod:`convmoe.distributed`, which sums routing statistics over ranks for any training loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs and which part of the job it is.

    Attributes:
        rank: Global rank (0 in a single process).
        local_rank: Rank on this node; picks the GPU.
        world_size: Number of processes.
        device: This process's device.

    Example:
        >>> DistributedContext(0, 0, 1, torch.device("cpu")).is_main
        True
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def setup_distributed(accelerator: str = "auto") -> DistributedContext:
    """Read torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), pick the device and
    join the process group (NCCL on GPUs, Gloo on CPUs) when there is more than one process.

    Args:
        accelerator: ``"auto"`` (a GPU when there is one), ``"cpu"``, or ``"gpu"``/``"cuda"``.

    Raises:
        ValueError: Unknown accelerator, or a GPU asked for where there is none.

    Example:
        >>> setup_distributed("cpu").device
        device(type='cpu')
    """
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r} is not supported; use one of {', '.join(ACCELERATORS)}.")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and accelerator != "cpu"
    if accelerator in ("gpu", "cuda") and not use_cuda:
        raise ValueError(f"accelerator={accelerator!r} but no CUDA device is available; use accelerator=auto or cpu.")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined.

    Example:
        >>> cleanup_distributed()
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (itself in a single process); the input is not modified.

    Example:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.clone()
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process, by rank (``[obj]`` in a single process); objects are pickled to travel.

    Example:
        >>> all_gather_objects({"rank": 0})
        [{'rank': 0}]
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every process (no-op in a single process).

    Example:
        >>> barrier()
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy process ``src``'s buffers (BatchNorm running statistics) to every process, in place.

    DDP broadcasts buffers at the start of each training forward, so after the last step every
    process holds statistics updated by its own batch; evaluation and the checkpoint (written by
    rank 0) must agree on one set.

    Example:
        >>> broadcast_buffers(torch.nn.BatchNorm2d(4))  # a no-op in a single process
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: each sample is evaluated exactly once.

    Unlike ``DistributedSampler`` it does not pad the last shard with repeated samples, so
    metrics summed over processes are exact.

    Example:
        >>> list(ShardSampler(range(5), rank=1, world_size=2))
        [1, 3]
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
