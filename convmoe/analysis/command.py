"""``convmoe analyze MODEL DATA``: the routing analysis of a saved model on a dataset, from the command line.

    convmoe analyze runs/camvid_moe/export tests/fixtures/camvid --split val --out analysis/
    convmoe analyze org/resnet18-moe-cifar10 data/cifar10_folder --split test --image-size 32 32

Prints the specialisation/balance table and the redundancy ranking, and writes the heatmaps (CSV,
PNG), routing maps, ``report.json`` and, with ``--model-card``, ``model_card.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from convmoe.analysis.datasets import load_dataset
from convmoe.analysis.model_card import CARD_IMAGE_NAME, model_card_section
from convmoe.analysis.report import analyze
from convmoe.engine.cli import add_trust_remote_code_argument, parse_device
from convmoe.engine.config import load_config
from convmoe.engine.config_check import check_training_config
from convmoe.engine.evaluate import load_model
from convmoe.hub import from_pretrained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``convmoe analyze``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> parser.parse_args(["model", "data", "--split", "val"]).split
        'val'
    """
    parser.add_argument("model", help="a folder written by convmoe.save_pretrained (or a model class's save_pretrained), "
                        "a training checkpoint .pt, or a Hub repo id 'org/name'")
    parser.add_argument("data", help="an image folder (root/<class>/<image>), a CamVid folder (root/<split>, "
                        "root/<split>annot) or a YAML training config (its <split>_dataset)")
    parser.add_argument("--split", default=None, help="split sub-folder or config section (CamVid/config default: val)")
    parser.add_argument("--out", default="analysis", help="output folder (default: analysis)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (default: main)")
    add_trust_remote_code_argument(parser)
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="resize folder images to H W (needed when their sizes differ)")
    parser.add_argument("--normalize", choices=("imagenet", "none"), default="imagenet",
                        help="input normalisation of folder images (default: imagenet mean/std)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="use at most this many batches, drawn at random (seed 0) from the whole dataset so that "
                             "a folder sorted by class is still represented")
    parser.add_argument("--images", type=int, default=4, help="images drawn in the routing maps (default: 4; 0: none)")
    parser.add_argument("--ignore-index", type=int, default=None,
                        help="unlabelled pixel value (default: the dataset's, CamVid 11)")
    parser.add_argument("--no-redundancy", action="store_true", help="skip folding each layer back (faster)")
    parser.add_argument("--fold", choices=("average", "usage"), default="average",
                        help="how experts are folded into one conv for the redundancy analysis (default: average)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="largest relative metric loss for which a layer is recommended for folding (default: 0.01)")
    parser.add_argument("--model-card", action="store_true", help="also write model_card.md with the routing section")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load_analysis_model(source: str, revision: str | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model to analyse: a ``save_pretrained`` folder, a training checkpoint or a Hub id (eval mode).

    Args:
        source: The folder, checkpoint or Hub id.
        revision: Hub branch, tag or commit (a Hub id only).
        trust_remote_code: Allow building base models from callables outside convmoe's allow-list.

    Example:
        >>> load_analysis_model("no/such/file.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: checkpoint no/such/file.pt does not exist.
    """
    if revision is not None:
        return from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code).eval()
    return load_model(source, None, trust_remote_code=trust_remote_code)[0]


def check_data_config(data: str, split: str | None) -> None:
    """When ``data`` is a YAML training config, check the ``<split>_dataset`` that will be analysed
    (a ``_target_`` mapping or a list of them) before the model is loaded.

    Raises:
        ValueError: The section is not a dataset node; the message names it and the fix.

    Example:
        >>> check_data_config("tests/fixtures/camvid", None)  # a folder: nothing to check
    """
    path = Path(data)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return
    key = f"{split or 'val'}_dataset"
    config = load_config(path)
    if key in config:
        check_training_config({key: config[key]})


def _sample_images(dataset: Any, count: int) -> tuple[torch.Tensor | None, list[str] | None]:
    if count <= 0:
        return None, None
    # Evenly spaced through the dataset: folders are sorted by class, so this shows several classes.
    step = max(len(dataset) // count, 1)
    items = [dataset[i] for i in range(0, len(dataset), step)][:count]
    images = [item["image"] if isinstance(item, dict) else item[0] for item in items]
    if len({tuple(image.shape) for image in images}) > 1:
        images = images[:1]
        items = items[:1]
    captions = None
    classes = getattr(dataset, "classes", None)
    if items and isinstance(items[0], dict) and "label" in items[0]:
        captions = [str(classes[item["label"]]) if classes is not None else str(item["label"]) for item in items]
    return torch.stack(images), captions


def random_sample(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
    """``size`` items of ``dataset`` drawn without replacement (in dataset order), or the whole dataset
    when it is not larger: the first batches of a class-sorted folder would hold a single class.

    Example:
        >>> len(random_sample(list(range(10)), 3)), random_sample([1, 2], 5)
        (3, [1, 2])
    """
    if size >= len(dataset):
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, indices.sort().values.tolist())


def run(args: argparse.Namespace) -> int:
    """Run ``convmoe analyze`` with parsed arguments; returns the exit status."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1.")
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(f"--max-batches {args.max_batches} must be >= 1 (leave it out for the whole dataset).")
    device = parse_device(args.device)
    check_data_config(args.data, args.split)
    model = load_analysis_model(args.model, args.revision, args.trust_remote_code).to(device)
    dataset = load_dataset(args.data, args.split, args.image_size, args.normalize)
    sample = random_sample(dataset, args.max_batches * args.batch_size) if args.max_batches else dataset
    loader = DataLoader(sample, batch_size=args.batch_size, shuffle=False, num_workers=0)
    ignore_index = args.ignore_index if args.ignore_index is not None else getattr(dataset, "ignore_index", None)
    classes = getattr(dataset, "classes", None)
    images, captions = _sample_images(dataset, args.images)
    data_name = f"{args.data}" + (f" ({args.split})" if args.split else "")
    report = analyze(model, loader, args.out, class_names=list(classes) if classes is not None else None,
                     ignore_index=ignore_index, num_classes=len(classes) if classes is not None else None,
                     images=images, captions=captions, redundancy=not args.no_redundancy, how=args.fold,
                     tolerance=args.tolerance, device=device, max_batches=args.max_batches,
                     progress=not args.no_progress, model_name=str(args.model), data_name=data_name)
    print(report.table())
    if report.redundancy is not None:
        print()
        print(report.redundancy.table())
    if args.model_card:
        card = Path(args.out) / "model_card.md"
        card.write_text(model_card_section(report, folder=args.out), encoding="utf-8")
        report.files["model_card_md"] = str(card)
        report.files["model_card_png"] = str(Path(args.out) / CARD_IMAGE_NAME)
        report.write_json(report.files["report_json"])
    print()
    print(f"wrote {len(_files(report))} files to {args.out}/: " + ", ".join(sorted(Path(f).name for f in _files(report))))
    return 0


def _files(report: Any) -> list[str]:
    files = list(report.files.values())
    for layer in report.layers.values():
        files += list(layer.files.values())
    return files
