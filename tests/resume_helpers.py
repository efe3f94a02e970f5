"""Helpers for tests/test_engine_resume.py: a tiny resumable run, and ways to kill it at a chosen point.

Kept out of the library: the test's subprocesses reach this module through ``PYTHONPATH`` and a
``_target_`` in the config (the pausing dataset), or run it as a script (the dying ``torch.save``):

    python tests/resume_helpers.py kill-on-save N CONFIG [key=value ...]
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN_IMAGES, BATCH_SIZE, MAX_EPOCHS = 20, 4, 3  # 5 steps per epoch


def tiny_run_config(out: Path, pause_at: int | None = None, marker: Path | None = None) -> dict[str, Any]:
    """timm's test_resnet with a noisy-router MoE last stage on the CIFAR-10 fixture: 3 epochs of 5 steps.

    Shuffled, randomly flipped and routed with noise, so the data order and every random stream
    matter; ``pause_at``/``marker`` go to :class:`PausingDataset`.
    """
    root = str(FIXTURES / "cifar-10-batches-py")
    normalize = {"_target_": "convmoe.data.transforms.Normalize", "mean": [0.49, 0.48, 0.45],
                 "std": [0.25, 0.24, 0.26]}
    return {
        "model": {"_target_": "convmoe.models.create_classifier", "model_name": "test_resnet", "num_classes": 10,
                  "moe_targets": "last", "moe_config": {"num_experts": 4, "top_k": 1, "noise_std": 1.0}},
        "loss": {"_target_": "torch.nn.CrossEntropyLoss"},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-2},
        "scheduler_list": [{"scheduler": {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 1e-2},
                            "interval": "step"}],
        "trainer": {"max_epochs": MAX_EPOCHS, "default_root_dir": str(out), "enable_progress_bar": False,
                    "accelerator": "cpu", "track_routing": False, "resume": None},
        "data_loader": {"batch_size": BATCH_SIZE, "num_workers": 0},
        "train_dataset": {
            "_target_": "resume_helpers.PausingDataset",
            "dataset": {"_target_": "convmoe.data.CIFAR10Dataset", "root": root, "split": "train",
                        "augmentation_list": [{"_target_": "convmoe.data.transforms.HorizontalFlip"}, normalize]},
            "pause_at": pause_at, "marker": None if marker is None else str(marker),
            "data_loader": {"shuffle": True}},
        "val_dataset": {"_target_": "convmoe.data.CIFAR10Dataset", "root": root, "split": "test",
                        "augmentation_list": [normalize]},
    }


class PausingDataset(Dataset):
    """``dataset`` unchanged, except that its ``pause_at``-th item read in this process writes
    ``marker`` and then blocks, so that a test can kill the run at a known point mid-epoch."""

    def __init__(self, dataset: Dataset, pause_at: int | None = None, marker: str | None = None) -> None:
        self.dataset, self.pause_at, self.marker, self.reads = dataset, pause_at, marker, 0
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        self.reads += 1
        if self.reads == self.pause_at:
            Path(self.marker).write_text(str(index))
            time.sleep(600)  # the test kills the process here
        return self.dataset[index]


def kill_on_save(save_number: int) -> None:
    """Make the ``save_number``-th ``torch.save`` of this process write half its bytes, then SIGKILL it."""
    real_save = torch.save
    calls = 0

    def dying_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls != save_number:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(data)
            f.flush()
        else:
            Path(f).write_bytes(data)
        os.kill(os.getpid(), signal.SIGKILL)
        return None

    torch.save = dying_save


def main(argv: list[str]) -> int:
    """``kill-on-save N CONFIG [key=value ...]``: train, dying inside the N-th checkpoint write."""
    if len(argv) < 3 or argv[0] != "kill-on-save":
        raise ValueError("usage: python tests/resume_helpers.py kill-on-save N CONFIG [key=value ...]")
    from convmoe.engine.trainer import train

    kill_on_save(int(argv[1]))
    train(argv[2], argv[3:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
