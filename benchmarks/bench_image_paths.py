"""Image tokens: merged per-image experts (one grouped conv), per-expert sub-batches (the regions path)
and gathered rows (the experts as matrix products over the routed positions).

All three are exact. This times them against the dense conv, interleaved, for a few layer shapes and
batch sizes, so ``"auto"``'s choice rests on a measurement. ``--kernel 1`` times pointwise convs (the
shapes of EfficientNet-Lite0's last stage and head), where gathering copies each input position once;
``--train`` times a forward and backward pass in training mode instead of inference; ``--channels-last``
runs the convs, the blocks and the input channels-last, as the recipes train and evaluate. One JSON line per
case.

    python benchmarks/bench_image_paths.py --threads 1 --out benchmarks/results/image_paths_1thread.jsonl
    python benchmarks/bench_image_paths.py --threads 1 --kernel 1 --train --batches 8 64
    python benchmarks/bench_image_paths.py --threads 1 --kernel 1 --channels-last --max-side 7 --batches 1 8 32
    python benchmarks/bench_image_paths.py --device cuda --dtype bfloat16     # on a GPU
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

from convmoe import MoEConv2d

SHAPES = {3: [(64, 64, 32), (256, 256, 14), (32, 32, 56), (256, 256, 7), (192, 192, 3)],  # (C_in, C_out, map side)
          1: [(192, 1152, 3), (1152, 192, 3), (320, 1280, 3), (112, 672, 6), (192, 1152, 7), (112, 672, 14),
              (64, 256, 32)]}  # 1x1: EfficientNet-Lite0's last stage and head at 96 and 224 px
PATHS = ("merged", "regions", "gathered")


def _step(module: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    """One inference pass, or one training pass (forward and backward)."""
    if not train:
        return lambda: module(x)

    def forward_backward() -> None:
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    return forward_backward


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kernel", type=int, default=3, choices=sorted(SHAPES))
    parser.add_argument("--train", action="store_true", help="time forward and backward in training mode")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="channels-last convs, blocks and input")
    parser.add_argument("--max-side", type=int, default=None, help="only the shapes whose map is at most this wide")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    shapes = [shape for shape in SHAPES[args.kernel] if args.max_side is None or shape[2] <= args.max_side]
    for (c_in, c_out, size), batch in itertools.product(shapes, args.batches):
        conv = nn.Conv2d(c_in, c_out, args.kernel, padding=args.kernel // 2, device=device, dtype=dtype)
        x = torch.randn(batch, c_in, size, size, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        blocks = {path: MoEConv2d.from_conv(conv, num_experts=args.experts, top_k=args.top_k, tokens="image",
                                            dispatcher=f"sparse:{path}").train(args.train) for path in PATHS}
        with torch.no_grad():
            blocks["merged"].router.gate.proj.weight.normal_()  # images spread over the experts
            state = blocks["merged"].state_dict()
            for path in PATHS[1:]:
                blocks[path].load_state_dict(state)
        conv.train(args.train).to(memory_format=memory_format)
        for block in blocks.values():
            block.to(memory_format=memory_format)
        steps = {"dense": _step(conv, x, args.train), **{p: _step(b, x, args.train) for p, b in blocks.items()}}
        with torch.set_grad_enabled(args.train):
            times = interleaved_median_ms(steps, warmup=2, reps=args.reps, device=device)
        write_jsonl(args.out, {
            "bench": "image_paths", "kernel": args.kernel, "mode": "train" if args.train else "inference",
            "c_in": c_in, "c_out": c_out, "size": size, "batch": batch, "experts": args.experts,
            "top_k": args.top_k, "dtype": args.dtype, "channels_last": args.channels_last,
            "dense_ms": round(times["dense"], 3),
            **{f"{path}_ratio": round(times[path] / times["dense"], 3) for path in PATHS}, "machine": machine(device),
        })


if __name__ == "__main__":
    main()
