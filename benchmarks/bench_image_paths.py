"""Image tokens: merged per-image experts (one grouped conv) against per-expert sub-batches (the regions path).

Both are exact; ``"auto"`` picks ``merged`` for image tokens. This times both against the dense conv,
interleaved, for a few layer shapes and batch sizes, so the choice rests on a measurement. One JSON
line per case.

    python benchmarks/bench_image_paths.py --threads 1 --out benchmarks/results/image_paths_1thread.jsonl
    python benchmarks/bench_image_paths.py --device cuda --dtype bfloat16     # on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median_ms, machine, write_jsonl

from convmoe import MoEConv2d

SHAPES = [(64, 32), (256, 14), (32, 56)]  # (channels, map side)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    for (channels, size), batch in itertools.product(SHAPES, args.batches):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)
        x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
        blocks = {path: MoEConv2d.from_conv(conv, num_experts=args.experts, top_k=args.top_k, tokens="image",
                                            dispatcher=f"sparse:{path}").eval() for path in ("merged", "regions")}
        with torch.no_grad():
            blocks["merged"].router.gate.proj.weight.normal_()  # images spread over the experts
            blocks["regions"].load_state_dict(blocks["merged"].state_dict())
            steps = {"dense": lambda conv=conv, x=x: conv(x),
                     **{path: (lambda b=block, x=x: b(x)) for path, block in blocks.items()}}
            times = interleaved_median_ms(steps, warmup=2, reps=args.reps, device=device)
        write_jsonl(args.out, {
            "bench": "image_paths", "channels": channels, "size": size, "batch": batch, "experts": args.experts,
            "top_k": args.top_k, "dtype": args.dtype, "dense_ms": round(times["dense"], 3),
            "merged_ratio": round(times["merged"] / times["dense"], 3),
            "regions_ratio": round(times["regions"] / times["dense"], 3), "machine": machine(device),
        })


if __name__ == "__main__":
    main()
