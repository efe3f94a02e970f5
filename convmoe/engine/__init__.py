"""The training engine: YAML configs with ``_target_`` instantiation, the trainer, checkpoints, metrics, logging.

    from convmoe.engine import train
    result = train("configs/camvid_upernet_moe.yaml", ["trainer.max_epochs=10"])

or ``convmoe train CONFIG [key=value ...]``; under ``torchrun`` the same command trains with
DistributedDataParallel (``torchrun --nproc_per_node N -m convmoe.engine CONFIG``). Code from a floor
above the engine, such as the routing tracker of :mod:`convmoe.analysis`, runs in the loop as a
:class:`Callback`.
"""

from convmoe.engine.callbacks import Callback
from convmoe.engine.checkpoint import load_checkpoint, save_checkpoint
from convmoe.engine.config import instantiate, load_config, locate
from convmoe.engine.evaluate import evaluate, load_model, run_evaluation
from convmoe.engine.metrics import (
    ClassificationMetrics,
    SegmentationMetrics,
    confusion_matrix,
    iou_from_confusion,
)
from convmoe.engine.model_build import build_model
from convmoe.engine.trainer import Trainer, TrainerSettings, TrainResult, train

__all__ = [
    "Callback",
    "ClassificationMetrics",
    "SegmentationMetrics",
    "TrainResult",
    "Trainer",
    "TrainerSettings",
    "build_model",
    "confusion_matrix",
    "evaluate",
    "instantiate",
    "iou_from_confusion",
    "load_checkpoint",
    "load_config",
    "load_model",
    "locate",
    "run_evaluation",
    "save_checkpoint",
    "train",
]
