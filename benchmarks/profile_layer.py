"""Operator breakdown of one MoE layer call (torch.profiler), as in the layer benchmark.

Profiles the sparse ``MoEConv2d.from_conv`` block of ``bench_layer.py`` (default CPU 4x64x32x32, 3x3,
E=8, top-2) for each tokens kind and mode, and prints the top operators by self CPU time with their
share of the call, plus the dense conv's time in the same run. One JSON line per case (``--out``).

    python benchmarks/profile_layer.py --threads 1 --tokens pixel grid:3x3 image --cases eval-fwd train-fwdbwd
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import make_step
from common import interleaved_median_ms, machine, write_jsonl

from convmoe import MoEConv2d


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", nargs="+", default=["pixel", "grid:3x3", "image"])
    parser.add_argument("--cases", nargs="+", default=["eval-fwd", "train-fwdbwd"],
                        choices=["eval-fwd", "train-fwd", "eval-fwdbwd", "train-fwdbwd"])
    parser.add_argument("--dispatcher", default="sparse")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=20, help="profiled calls (after 5 warm-up calls)")
    parser.add_argument("--top", type=int, default=12, help="operators listed per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    dense = nn.Conv2d(args.channels, args.channels, args.kernel, padding=args.kernel // 2)
    for tokens in args.tokens:
        for case in args.cases:
            phase, mode = case.split("-")
            block = MoEConv2d.from_conv(dense, num_experts=args.experts, top_k=args.top_k, tokens=tokens,
                                        dispatcher=args.dispatcher).train(phase == "train")
            dense.train(phase == "train")
            steps = {"dense": make_step(dense, x, mode, _no_autocast),
                     "moe": make_step(block, x, mode, _no_autocast)}
            medians = interleaved_median_ms(steps, warmup=5, reps=args.reps)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.reps):
                    steps["moe"]()
            events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            total = sum(e.self_cpu_time_total for e in events)
            events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
            top = [{"op": e.key, "calls_per_step": round(e.count / args.reps, 1),
                    "self_us_per_step": round(e.self_cpu_time_total / args.reps, 1),
                    "percent": round(100 * e.self_cpu_time_total / total, 1)} for e in events[:args.top]]
            record = {"bench": "profile_layer", "tokens": tokens, "case": case, "experts": args.experts,
                      "top_k": args.top_k, "dense_ms": round(medians["dense"], 3), "moe_ms": round(medians["moe"], 3),
                      "ratio": round(medians["moe"] / medians["dense"], 3),
                      "ops_per_step": round(sum(e.count for e in events) / args.reps, 1),
                      "profiled_ms_per_step": round(total / args.reps / 1e3, 3), "top": top, "machine": machine("cpu")}
            write_jsonl(args.out, record)
            print(f"# {tokens} {case}: moe {record['moe_ms']} ms, dense {record['dense_ms']} ms, "
                  f"ratio {record['ratio']}, {record['ops_per_step']} ops/step", file=sys.stderr)
            for row in top:
                print(f"#   {row['percent']:5.1f}%  {row['self_us_per_step']:9.1f} us  x{row['calls_per_step']:<5} "
                      f"{row['op']}", file=sys.stderr)


def _no_autocast() -> torch.autocast:
    return torch.autocast("cpu", enabled=False)


if __name__ == "__main__":
    main()
