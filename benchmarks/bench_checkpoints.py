"""Trained models against each other, on real images: the first source is the baseline.

Random weights route every image of a batch alike (an untrained gate sees nearly the same pooled
features), which hides what dispatch costs when a trained router spreads the images over the experts.
This times trained checkpoints (``.pt``, ``save_pretrained`` folders or Hub ids), interleaved, in the
same run:

- latency (eval, no grad) at batch 1 and at ``--batch``;
- a training step at ``--batch`` (train mode, forward, cross-entropy + aux loss, backward), with the
  parameters under ``--freeze`` taking no gradient, as the recipes freeze them;
- how many experts the first MoE block used for that batch, so a collapsed routing shows.

One JSON line per source (ratios to the first) is printed and appended to ``--out``.

    python benchmarks/bench_checkpoints.py runs/zoo_cifar10_upcycled/dense_continued/seed0/checkpoints/best.pt \\
        runs/zoo_cifar10_upcycled/moe_upcycled_last_stage_image_top1/seed0/checkpoints/best.pt \\
        --images .data/cifar10/test --size 96 --batch 64 --threads 1 --freeze conv_stem bn1 blocks.0 blocks.1 blocks.2
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median_ms, machine, write_jsonl

import convmoe
from convmoe.data import ImageFolderDataset
from convmoe.data.transforms import Normalize, Resize
from convmoe.engine.evaluate import load_model


def image_batch(root: Path, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images of an image-folder split (``root/<class>/<file>``), classes in turn, resized and
    normalised with the ImageNet statistics as the recipes evaluate, with their labels."""
    try:
        dataset = ImageFolderDataset(root, augmentation_list=[Resize(size, size), Normalize()])
    except ValueError as error:
        raise SystemExit(f"{error} Point --images to an image-folder split.") from None
    if len(dataset) < count:
        raise SystemExit(f"{root} holds {len(dataset)} images, fewer than the batch of {count}; lower --batch.")
    by_class = [[i for i, (_, label) in enumerate(dataset.samples) if label == c] for c in range(len(dataset.classes))]
    in_turn = [i for group in itertools.zip_longest(*by_class) for i in group if i is not None]
    items = [dataset[i] for i in in_turn[:count]]
    x = torch.stack([item["image"] for item in items]).contiguous(memory_format=torch.channels_last)
    return x, torch.tensor([item["label"] for item in items])


def train_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), labels) + convmoe.aux_loss(model)
        loss.backward()
    return step


def eval_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.no_grad():
            model(x)
    return step


def experts_used(model: nn.Module) -> int | None:
    """Experts the first MoE block sent at least one token to in its last call."""
    block = next((m for m in model.modules() if isinstance(m, convmoe.MoEConv2d)), None)
    if block is None or block.last_routing is None:
        return None
    return int((block.last_routing.dense_weights() != 0).flatten(0, 1).any(dim=0).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="checkpoints or folders; the first is the baseline")
    parser.add_argument("--images", required=True, type=Path, help="an image-folder split (root/<class>/*.png)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--freeze", nargs="+", default=[], metavar="MODULE",
                        help="modules whose parameters take no gradient (convmoe.freeze_modules)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {source: load_model(source)[0].to(memory_format=torch.channels_last) for source in args.sources}
    for model in models.values():
        if args.freeze:
            convmoe.freeze_modules(model, args.freeze)
    x, labels = image_batch(args.images, args.batch, args.size)
    times = {"latency_b1": interleaved_median_ms({s: eval_step(m, x[:1]) for s, m in models.items()},
                                                 warmup=args.warmup, reps=args.reps),
             f"latency_b{args.batch}": interleaved_median_ms({s: eval_step(m, x) for s, m in models.items()},
                                                              warmup=args.warmup, reps=args.reps)}
    used = {s: experts_used(m) for s, m in models.items()}  # the last call was the eval at --batch
    times["train_step"] = interleaved_median_ms({s: train_step(m, x, labels) for s, m in models.items()},
                                                warmup=args.warmup, reps=args.reps)
    baseline = args.sources[0]
    for source in args.sources:
        write_jsonl(args.out, {
            "bench": "checkpoints", "source": source, "baseline": baseline, "batch": args.batch, "size": args.size,
            "frozen": list(args.freeze), "experts_used_at_batch": used[source],
            **{f"{name}_ms": round(t[source], 2) for name, t in times.items()},
            **{f"{name}_ratio": round(t[source] / t[baseline], 3) for name, t in times.items()},
            "machine": machine("cpu"),
        })


if __name__ == "__main__":
    main()
