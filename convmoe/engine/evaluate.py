"""Evaluation: the validation loop the trainer runs, and ``convmoe eval`` on a checkpoint or Hub id."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.engine.checkpoint import load_checkpoint
from convmoe.engine.config import instantiate, load_config
from convmoe.engine.config_check import check_training_config
from convmoe.engine.loaders import build_dataloader
from convmoe.engine.metrics import ClassificationMetrics, SegmentationMetrics, check_output_fits_target
from convmoe.engine.model_build import build_model
from convmoe.engine.processes import all_reduce_sum, setup_distributed
from convmoe.engine.saved_models import checkpoint_weights, is_checkpoint_file, load_saved_model
from convmoe.engine.settings import TrainerSettings
from convmoe.hub import check_state_matches
from convmoe.progress import progress_bar
from convmoe.trust import check_config_targets

Metric = ClassificationMetrics | SegmentationMetrics
PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_PRECISION_ALIASES = {"32-true": "32", "32": "32", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
                      "16": "16-mixed", "16-mixed": "16-mixed"}


def resolve_precision(precision: str | int, device: torch.device) -> str:
    """``"32"``, ``"bf16-mixed"`` or ``"16-mixed"``; ``"auto"`` is bf16 autocast on a GPU and fp32 elsewhere.

    Lightning's spellings (``32``, ``"32-true"``, ``"bf16"``, ``16``) are accepted.

    Example:
        >>> resolve_precision("auto", torch.device("cpu")), resolve_precision(16, torch.device("cpu"))
        ('32', '16-mixed')
    """
    text = str(precision)
    if text == "auto":
        return "bf16-mixed" if device.type == "cuda" else "32"
    if text not in _PRECISION_ALIASES:
        raise ValueError(f"precision={precision!r} is not supported; use auto, 32, bf16-mixed or 16-mixed.")
    return _PRECISION_ALIASES[text]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (a no-op for ``"32"``).

    Example:
        >>> with autocast(torch.device("cpu"), "32"):
        ...     pass
    """
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(inputs, targets) from a batch: a dict with ``image`` and ``mask``/``label``/``target``, or a pair.

    Example:
        >>> x, y = split_batch({"image": torch.zeros(2, 3, 4, 4), "label": torch.tensor([1, 0])})
        >>> y.tolist()
        [1, 0]
    """
    if isinstance(batch, Mapping):
        for key in ("mask", "label", "target"):
            if key in batch:
                return batch["image"], batch[key]
        raise KeyError(f"batch dict has keys {sorted(batch)}; expected 'image' and one of 'mask', 'label', 'target'.")
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}; datasets should return dicts "
                    "{'image', 'mask' | 'label'} or (image, target) pairs.")


def batch_to(inputs: Tensor, target: Tensor, device: torch.device,
             memory_format: torch.memory_format = torch.preserve_format) -> tuple[Tensor, Tensor]:
    """A batch moved to ``device``; image batches (4-D) also to ``memory_format`` (e.g. ``torch.channels_last``).

    Example:
        >>> x, _ = batch_to(torch.zeros(2, 3, 4, 4), torch.zeros(2), torch.device("cpu"), torch.channels_last)
        >>> x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()
        (True, False)
    """
    image_format = memory_format if inputs.dim() == 4 else torch.preserve_format
    return (inputs.to(device, non_blocking=True, memory_format=image_format),
            target.to(device, non_blocking=True))


def model_output(output: Any) -> Tensor:
    """The logits of a model's output (the first item when a model also returns auxiliary outputs).

    Example:
        >>> model_output((torch.ones(1), torch.zeros(1))).tolist()
        [1.0]
    """
    if isinstance(output, (list, tuple)):
        return output[0]
    return output


def create_metric(task: str, logits: Tensor, ignore_index: int | None = None,
                  class_names: Sequence[str] | None = None) -> Metric:
    """The metric of ``task`` ("classification", "segmentation" or "auto": from the logits' rank), sized from the logits.

    Example:
        >>> type(create_metric("auto", torch.zeros(2, 5, 8, 8))).__name__
        'SegmentationMetrics'
    """
    if task == "auto":
        task = "segmentation" if logits.dim() == 4 else "classification"
    num_classes = logits.shape[1]
    if task == "classification":
        return ClassificationMetrics(topk=(1, 5) if num_classes > 5 else (1,))
    if task == "segmentation":
        names = class_names if class_names is not None and len(class_names) == num_classes else None
        return SegmentationMetrics(num_classes, ignore_index=ignore_index, class_names=names)
    raise ValueError(f"task={task!r} must be 'classification', 'segmentation' or 'auto'.")


def loss_ignore_index(loss_fn: Any) -> int | None:
    """The target value a loss ignores (its ``ignore_index``), which the metrics then skip too; None if it has none.

    Example:
        >>> loss_ignore_index(nn.CrossEntropyLoss(ignore_index=11)), loss_ignore_index(nn.CrossEntropyLoss())
        (11, None)
    """
    value = getattr(loss_fn, "ignore_index", None)
    return value if isinstance(value, int) and value >= 0 else None


def limit_batches(limit: float | None, available: int) -> int:
    """Batches to run: all (None), a count (int), or a fraction of them (float in (0, 1]).

    Example:
        >>> limit_batches(None, 10), limit_batches(3, 10), limit_batches(0.25, 10)
        (10, 3, 3)
    """
    if limit is None:
        return available
    if isinstance(limit, float):
        if not 0 < limit <= 1:
            raise ValueError(f"a fractional batch limit must be in (0, 1], got {limit}.")
        return max(1, math.ceil(limit * available))
    return min(int(limit), available)


@torch.no_grad()
def run_evaluation(model: nn.Module, loader: Iterable, device: torch.device, *, task: str = "auto",
                   loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, precision: str = "32",
                   ignore_index: int | None = None, class_names: Sequence[str] | None = None,
                   max_batches: int | None = None, progress: bool = False, sync: Callable[[Metric], None] | None = None,
                   description: str = "eval",
                   memory_format: torch.memory_format = torch.preserve_format) -> dict[str, float]:
    """Metrics (and the mean loss with ``loss_fn``) of ``model`` in eval mode over ``loader``.

    Args:
        model: The model (it is put in eval mode).
        loader: Batches as :func:`split_batch` reads them.
        device: Where to run.
        task: "classification", "segmentation" or "auto".
        loss_fn: Optional task loss, reported as ``loss``.
        precision: A resolved precision (:func:`resolve_precision`).
        ignore_index: Target value not scored (segmentation).
        class_names: Names for the per-class IoU keys.
        max_batches: Stop after this many batches.
        progress: Show a progress bar.
        sync: Called with the metric (and the loss totals are summed) before computing, to combine processes.
        description: The progress bar's label.
        memory_format: The image batches' memory format (``torch.channels_last`` for a channels-last model).

    Returns:
        ``{"top1", "top5"}`` or ``{"miou", "pixel_accuracy", "iou/<class>"...}``, plus ``loss``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))]
        >>> sorted(run_evaluation(model, batches, torch.device("cpu")))
        ['top1']
    """
    model.eval()
    metric: Metric | None = None
    loss_total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(progress_bar(loader, description=description, enabled=progress)):
        if max_batches is not None and i >= max_batches:
            break
        inputs, target = batch_to(*split_batch(batch), device, memory_format)
        with autocast(device, precision):
            logits = model_output(model(inputs))
            if metric is None:
                check_output_fits_target(logits, target, ignore_index)
            if loss_fn is not None:
                loss_total += float(loss_fn(logits, target)) * inputs.shape[0]
                count += inputs.shape[0]
        if metric is None:
            metric = create_metric(task, logits, ignore_index, class_names)
        metric.update(logits.float(), target)
    if metric is None:
        raise ValueError("the evaluation loader gave no batch; check the dataset and limit_val_batches.")
    if sync is not None:
        sync(metric)
        loss_total, count = _sum_processes(loss_total, device), _sum_processes(count, device)
    results = metric.compute()
    if loss_fn is not None:
        results["loss"] = float(loss_total / count.clamp_min(1))
    return results


def _sum_processes(value: Tensor, device: torch.device) -> Tensor:
    return all_reduce_sum(value.to(device)).cpu()


def load_model(source: str | Path, config: Mapping[str, Any] | None = None,
               trust_remote_code: bool = False) -> tuple[nn.Module, dict[str, Any] | None]:
    """A trained model from a training checkpoint (``.pt``), a ``save_pretrained`` folder, or a Hub id.

    A training checkpoint rebuilds the model from ``config["model"]`` when the caller gives one (the
    caller's own config), otherwise from the config stored in the checkpoint, whose ``_target_``
    entries must then be in :mod:`convmoe.trust`'s allow-list. A folder or Hub id is read by the
    class recorded in its ``config.json``: a :mod:`convmoe.models` class or an smp architecture
    (``_model_class``), otherwise :func:`convmoe.hub.from_pretrained` (a patched model).

    Args:
        source: The checkpoint file, folder or Hub id.
        config: The caller's config; its ``model`` section wins over the checkpoint's.
        trust_remote_code: Build targets outside the allow-list from the checkpoint's own config or
            a folder's recipe. Only for sources you trust.

    Returns:
        The model (eval mode) and the checkpoint's training config (None for a folder or Hub id).

    Raises:
        FileNotFoundError: No such file, folder or Hub repo.
        convmoe.trust.UntrustedCodeError: The checkpoint names a target outside the allow-list.
        ValueError: A checkpoint without a model config, or weights that do not fit the model.

    Example:
        >>> load_model("no/such/file.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: checkpoint no/such/file.pt does not exist.
    """
    path = Path(source)
    if is_checkpoint_file(path):
        state = load_checkpoint(path)
        train_config = state.get("config") or {}
        if not isinstance(train_config, Mapping):
            raise ValueError(f"{path} holds a config of type {type(train_config).__name__}, not a mapping; the "
                             "checkpoint is corrupt, pass a config with a 'model' section (--config).")
        model_node = (config or {}).get("model")
        if model_node is None:
            model_node = train_config.get("model")
            check_config_targets(model_node, trust_remote_code, f"the checkpoint {path}")
        if model_node is None:
            raise ValueError(f"{path} holds no model config; pass a config with a 'model' section.")
        if not isinstance(model_node, Mapping) or "_target_" not in model_node:
            raise ValueError(f"the model section for {path} must be a mapping with a _target_ (e.g. _target_: "
                             f"convmoe.models.UPerNetMoE), got {model_node!r:.80}; fix the config's 'model' section.")
        # The patch section follows the model section: the caller's with its model, else the checkpoint's.
        patch = (config if (config or {}).get("model") is not None else train_config).get("patch")
        model = build_model({"model": model_node, "patch": patch}, pretrained=False)
        if not isinstance(model, nn.Module):
            raise ValueError(f"the model section for {path} built a {type(model).__name__}, not an nn.Module; fix "
                             "the config's 'model' section.")
        _load_checkpoint_weights(model, checkpoint_weights(path, state), path)
        return model.eval(), dict(train_config)
    return load_saved_model(str(source), trust_remote_code).eval(), None


def _load_checkpoint_weights(model: nn.Module, weights: Mapping[str, Any], path: Path) -> None:
    check_state_matches(model, dict(weights), strict=True, where=str(path),
                        fix="the checkpoint was trained with another model config; pass the config it was trained "
                            "with (--config), or leave --config out to use the checkpoint's own")
    model.load_state_dict(weights)


def evaluate(source: str | Path, config: Mapping[str, Any] | str | Path | None = None, overrides: Sequence[str] = (),
             split: str = "val", progress: bool = True, trust_remote_code: bool = False,
             max_batches: int | None = None) -> dict[str, float]:
    """``convmoe eval``: metrics of a trained model on the ``<split>_dataset`` of a config.

    Every sample is read once, in order. A split with random transforms (``train``) draws them from
    the loader's own stream, seeded by the config's seed (:func:`~convmoe.engine.loaders.evaluation_seed`):
    the same figures on every run, and never the views of a training epoch.

    Args:
        source: A training checkpoint, a ``save_pretrained`` folder, or a Hub id (see :func:`load_model`).
        config: A config (dict or YAML) naming the dataset; default: the checkpoint's training config
            (required for a folder or Hub id).
        overrides: ``key=value`` overrides of that config (e.g. the dataset's root).
        split: Evaluate ``val_dataset``, ``test_dataset`` or ``train_dataset``.
        progress: Show a progress bar.
        trust_remote_code: Build ``_target_`` entries outside :mod:`convmoe.trust`'s allow-list when
            the checkpoint's own config is used. Only for checkpoints you trust.
        max_batches: Score only the first this many batches (a quick look, not the split's figure); None:
            the whole split. The recipe's ``trainer.limit_val_batches`` limits validation in training only.

    Returns:
        The metrics (``loss`` too when the config has a ``loss``).

    Raises:
        convmoe.trust.UntrustedCodeError: The checkpoint's own config names a target outside the
            allow-list (a ``ValueError``).
        ValueError: No config, or no such dataset in it.

    Example:
        >>> evaluate("runs/camvid/checkpoints/best.pt", split="test")  # doctest: +SKIP
        {'miou': 0.61, ...}
    """
    given = load_config(config, overrides) if config is not None else None
    model, train_config = load_model(source, given, trust_remote_code=trust_remote_code)
    if given is None:
        if not train_config:
            raise ValueError(f"{source} carries no training config; name the dataset with a recipe: --config "
                             "RECIPE.yaml (config= in Python). A zoo card's Usage section gives its recipe.")
        given = load_config(train_config, overrides)
        check_config_targets(given, trust_remote_code, f"the checkpoint {source}")
    check_training_config(given, TrainerSettings)
    node = given.get(f"{split}_dataset")
    if not node:
        raise ValueError(f"the config has no {split}_dataset section to evaluate; available: "
                         f"{sorted(k for k in given if k.endswith('_dataset'))}.")
    settings = TrainerSettings.from_config(given)
    ctx = setup_distributed(settings.accelerator)
    loader = build_dataloader(node, given.get("data_loader") or {}, ctx, train=False, seed=settings.seed or 0)
    loss_fn = instantiate(given["loss"]) if given.get("loss") else None
    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(ctx.device)
    ignore_index = given.get("ignore_index", loss_ignore_index(loss_fn))
    return run_evaluation(model.to(ctx.device), loader, ctx.device, task=given.get("task", "auto"), loss_fn=loss_fn,
                          precision=resolve_precision(settings.precision, ctx.device), ignore_index=ignore_index,
                          class_names=getattr(loader.dataset, "classes", None), progress=progress,
                          description=f"eval {split}", max_batches=max_batches)
