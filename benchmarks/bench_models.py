"""Model benchmark: dense networks against their MoE-patched twins.

For each model the dense network and a copy patched with ``convmoe.patch`` (upcycled, so both
compute the same function at the start) are timed round-robin in the same run:

- latency (eval, no grad) at batch 1 and at ``--batch``;
- training step time at ``--batch`` (forward, loss + aux loss, backward, SGD step);
- peak memory of a training step above what was allocated before it (CUDA:
  ``max_memory_allocated``; CPU: the profiler's record of allocations and frees);
- parameters, and FLOPs at batch 1 from ``convmoe.flops`` (fvcore convention: one fused
  multiply-add is one flop): active FLOPs of the patched model, and the dense model's.

One JSON line per model is printed (and appended to ``--out``).

    python benchmarks/bench_models.py --device cpu --batch 8 --size 128     # reduced sizes for a small CPU
    python benchmarks/bench_models.py --device cuda --batch 64 --size 224   # bfloat16 autocast, channels-last

Models: timm ``resnet50`` and ``efficientnet_lite0`` (MoE at the last stage's k x k convs) and an
smp ``UPerNet`` (resnet34 encoder; MoE at the encoder's last stage and the decoder's last conv).
Weights are random (nothing is downloaded). An untrained gate sends the images of a batch mostly to
one expert (it sees nearly the same pooled features for each), so per-image tokens time a collapsed
routing here; ``bench_checkpoints.py`` times trained checkpoints on real images instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median_ms, machine, synchronize, write_jsonl

import convmoe
from convmoe import MoEConfig

MODELS = {
    "resnet50": ("last_stage",),
    "efficientnet_lite0": ("last_stage",),
    "upernet": ("last_stage", "decoder_last"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=None, help="large batch; default 8 on CPU, 64 on CUDA")
    parser.add_argument("--size", type=int, default=None, help="input side; default 128 on CPU, 224 on CUDA")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-type", default="conv", choices=["conv", "lowrank"],
                        help="full-rank conv experts, or low-rank deltas on a shared conv (ungrouped targets only)")
    parser.add_argument("--rank", type=int, default=8, help="rank of low-rank experts")
    parser.add_argument("--targets", nargs="+", default=None,
                        help="patch targets for every model (default: the last stage's k x k convs, plus the "
                             "decoder's last conv for UPerNet)")
    parser.add_argument("--tokens", default="pixel")
    parser.add_argument("--dispatcher", default="sparse")
    parser.add_argument("--classes", type=int, default=None, help="default 1000 (classifiers), 11 (UPerNet)")
    parser.add_argument("--freeze", nargs="+", default=[], metavar="MODULE",
                        help="modules whose parameters take no gradient, in both models (convmoe.freeze_modules; "
                             "e.g. conv_stem bn1 blocks.0 blocks.1 blocks.2, as the CIFAR-10 recipes)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last inputs and weights (default: on CUDA only)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the peak memory of a training step")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    return parser.parse_args(argv)


def build(name: str, classes: int | None) -> nn.Module:
    """The dense network, random weights."""
    if name == "upernet":
        import segmentation_models_pytorch as smp

        return smp.UPerNet(encoder_name="resnet34", encoder_weights=None, classes=classes or 11)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=classes or 1000)


def patched(model: nn.Module, name: str, args: argparse.Namespace) -> nn.Module:
    config = MoEConfig(num_experts=args.experts, top_k=args.top_k, tokens=args.tokens, dispatcher=args.dispatcher,
                       experts=args.expert_type, expert_kwargs={"rank": args.rank} if args.expert_type == "lowrank" else {})
    return convmoe.patch(copy.deepcopy(model), targets=targets_of(name, args), config=config)


def targets_of(name: str, args: argparse.Namespace) -> list[str]:
    return list(args.targets or MODELS[name])


def loss_of(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output.float(), target)


class Setup:
    """Device, dtype, memory format and the autocast context of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        channels_last = self.cuda if args.channels_last is None else args.channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batch = args.batch or (64 if self.cuda else 8)
        self.size = args.size or (224 if self.cuda else 128)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, memory_format=self.memory_format)

    def inputs(self, batch: int, segmentation: bool, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, 3, self.size, self.size, device=self.device).contiguous(memory_format=self.memory_format)
        shape = (batch, self.size, self.size) if segmentation else (batch,)
        return x, torch.randint(0, classes, shape, device=self.device)


def eval_step(model: nn.Module, x: torch.Tensor, setup: Setup) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad(), setup.autocast():
            model(x)
    return step


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, setup: Setup) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        with setup.autocast():
            loss = loss_of(model(x), target) + convmoe.aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def peak_memory_mb(model: nn.Module, x: torch.Tensor, target: torch.Tensor, setup: Setup) -> float:
    """Peak memory of one training step above what was allocated before it, MiB (after a warm-up
    step, so the optimizer's state already exists).

    CUDA: ``max_memory_allocated``. CPU: the running sum of the allocations and frees the profiler
    records during the step (``profile_memory=True``), at its highest.
    """
    step = train_step(model, x, target, setup)
    step()
    synchronize(setup.device)
    if setup.cuda:
        before = torch.cuda.memory_allocated(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        step()
        synchronize(setup.device)
        return round((torch.cuda.max_memory_allocated(setup.device) - before) / 2**20, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return round(peak / 2**20, 1)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_model(name: str, args: argparse.Namespace, setup: Setup, where: dict[str, Any]) -> None:
    torch.manual_seed(0)
    classes = args.classes or (11 if name == "upernet" else 1000)
    dense = build(name, args.classes)
    moe = patched(dense, name, args)
    dense, moe = setup.prepare(dense), setup.prepare(moe)
    for model in (dense, moe) if args.freeze else ():
        convmoe.freeze_modules(model, args.freeze)
    segmentation = name == "upernet"

    one, _ = setup.inputs(1, segmentation, classes)
    report = convmoe.flops(moe.eval(), one)
    blocks = [n for n, m in moe.named_modules() if isinstance(m, convmoe.MoEConv2d)]

    record: dict[str, Any] = {
        "bench": "model", "model": name, "targets": targets_of(name, args), "blocks": len(blocks),
        "experts": args.experts, "top_k": args.top_k, "tokens": args.tokens, "dispatcher": args.dispatcher,
        "expert_type": args.expert_type, **({"rank": args.rank} if args.expert_type == "lowrank" else {}),
        "batch": setup.batch, "size": setup.size, "dtype": "bfloat16" if setup.cuda else "float32",
        "channels_last": setup.memory_format == torch.channels_last, "frozen": list(args.freeze),
        "dense_params": count_params(dense), "moe_params": count_params(moe),
        "dense_gflops": round(report.dense / 1e9, 3), "moe_active_gflops": round(report.active / 1e9, 3),
        "flops_convention": "fvcore (1 multiply-add = 1 flop), batch 1",
    }
    for batch in sorted({1, setup.batch}):
        x, _ = setup.inputs(batch, segmentation, classes)
        dense.eval(), moe.eval()
        times = interleaved_median_ms({"dense": eval_step(dense, x, setup), "moe": eval_step(moe, x, setup)},
                                      warmup=args.warmup, reps=args.reps, device=setup.device)
        record[f"dense_latency_b{batch}_ms"] = round(times["dense"], 2)
        record[f"moe_latency_b{batch}_ms"] = round(times["moe"], 2)
        record[f"latency_b{batch}_ratio"] = round(times["moe"] / times["dense"], 3)

    x, target = setup.inputs(setup.batch, segmentation, classes)
    dense.train(), moe.train()
    times = interleaved_median_ms({"dense": train_step(dense, x, target, setup),
                                   "moe": train_step(moe, x, target, setup)},
                                  warmup=args.warmup, reps=args.reps, device=setup.device)
    record["dense_train_step_ms"] = round(times["dense"], 2)
    record["moe_train_step_ms"] = round(times["moe"], 2)
    record["train_step_ratio"] = round(times["moe"] / times["dense"], 3)
    if args.memory:
        record["dense_peak_step_mb"] = peak_memory_mb(dense, x, target, setup)
        record["moe_peak_step_mb"] = peak_memory_mb(moe, x, target, setup)
    record["machine"] = where
    write_jsonl(args.out, record)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(args)
    where = machine(setup.device)
    for name in args.models:
        bench_model(name, args, setup, where)


if __name__ == "__main__":
    main()
