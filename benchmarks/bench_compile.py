"""torch.compile benchmark: a small patched CNN, eager against compiled, per dispatcher and phase.

For every case (dispatcher, phase) one JSON line: the eager and compiled medians (timed
round-robin in the same run), ``ratio = compiled_ms / eager_ms``, the time of the first compiled
call (compilation included), and dynamo's graph and graph-break counts.

    python benchmarks/bench_compile.py                         # sparse, dense, export x eval, train
    python benchmarks/bench_compile.py --dispatchers sparse --phases eval --reps 20

``export`` is the sparse model after ``convmoe.export.prepare_for_export`` (static shapes, one graph).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median_ms, machine, write_jsonl

import convmoe
from convmoe.export import prepare_for_export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dispatchers", nargs="+", default=["sparse", "dense", "export"],
                        choices=["sparse", "dense", "export"])
    parser.add_argument("--phases", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", default="pixel")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    return parser.parse_args(argv)


def build(args: argparse.Namespace, dispatcher: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    config = convmoe.MoEConfig(num_experts=args.experts, top_k=args.top_k, tokens=args.tokens,
                               dispatcher="dense" if dispatcher == "dense" else "sparse")
    convmoe.patch(model, targets=["2", "4"], config=config, upcycle=False)
    if dispatcher == "export":
        prepare_for_export(model)
    return model


def step_fn(model: nn.Module, x: torch.Tensor, phase: str):
    if phase == "eval":
        def run():
            with torch.no_grad():
                return model(x)
        return run

    def run():
        model.zero_grad(set_to_none=True)
        (model(x).square().mean() + convmoe.aux_loss(model)).backward()
    return run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("torch").setLevel(logging.ERROR)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    for dispatcher in args.dispatchers:
        for phase in args.phases:
            eager = build(args, dispatcher).train(phase == "train")
            target = copy.deepcopy(eager)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(step_fn(target, x, phase))()
            torch._dynamo.reset()
            compiled_model = torch.compile(target, backend=args.backend)
            compiled = step_fn(compiled_model, x, phase)
            start = time.perf_counter()
            compiled()
            first_call_s = time.perf_counter() - start
            medians = interleaved_median_ms({"eager": step_fn(eager, x, phase), "compiled": compiled},
                                            warmup=3, reps=args.reps)
            write_jsonl(args.out, {
                "bench": "compile", "dispatcher": dispatcher, "phase": phase, "backend": args.backend,
                "batch": args.batch, "size": args.size, "experts": args.experts, "top_k": args.top_k,
                "tokens": args.tokens, "eager_ms": round(medians["eager"], 3),
                "compiled_ms": round(medians["compiled"], 3),
                "ratio": round(medians["compiled"] / medians["eager"], 3),
                "first_compiled_call_s": round(first_call_s, 2), "graphs": explained.graph_count,
                "graph_breaks": explained.graph_break_count, "machine": machine("cpu"),
            })


if __name__ == "__main__":
    main()
