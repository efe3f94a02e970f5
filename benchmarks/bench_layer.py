"""Layer benchmark: a dense conv against MoEConv2d blocks of the same shape.

For every case (experts E, top-k, tokens, dispatcher, mode, phase) the dense conv and the MoE
block are timed round-robin in the same run, and one JSON line is printed (and appended to
``--out``) with both medians and ``ratio = moe_ms / dense_ms``.

    python benchmarks/bench_layer.py --device cpu                      # the full grid, float32
    python benchmarks/bench_layer.py --device cuda                     # bfloat16 autocast, channels-last
    python benchmarks/bench_layer.py --experts 8 --top-k 2 --tokens pixel --modes fwdbwd --phases train

Targets (see benchmarks/README.md): on CPU (float32, 4x64x32x32, 3x3, E=8, top-2, forward+backward)
the sparse block costs at most ``2 * k`` dense convs and beats the dense dispatcher by ``E / k / 1.5``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median_ms, machine, write_jsonl

from convmoe import MoEConv2d
from convmoe.dispatch.sparse import DEPRECATED_PATHS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype; default float32 on CPU, bfloat16 (autocast) on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="default 4 on CPU, 16 on CUDA")
    parser.add_argument("--channels", type=int, default=None, help="default 64 on CPU, 256 on CUDA")
    parser.add_argument("--size", type=int, default=None, help="feature map side; default 32 on CPU, 64 on CUDA")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--expert-type", nargs="+", default=["conv"], choices=["conv", "lowrank"],
                        help="expert banks to time: full-rank conv experts, low-rank deltas on a shared conv")
    parser.add_argument("--rank", type=int, default=8, help="rank of low-rank experts")
    parser.add_argument("--tokens", nargs="+", default=["pixel", "grid:3x3", "patch:8", "image"])
    parser.add_argument("--dispatchers", nargs="+", default=["dense", "sparse"],
                        help="dispatcher specs, e.g. dense sparse sparse:gathered sparse:regions sparse:merged "
                             "(the old sparse:pixels, sparse:columns, sparse:mixed still work)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    parser.add_argument("--phases", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last inputs; default on for CUDA, off for CPU")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--retries", type=int, default=0,
                        help="on a shared machine: re-time a case (after --retry-wait s) while its dense conv is "
                             "slower than --noise-tolerance x the fastest dense conv seen for that mode")
    parser.add_argument("--retry-wait", type=float, default=15.0)
    parser.add_argument("--noise-tolerance", type=float, default=1.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    args.dispatchers = [current_spec(spec) for spec in args.dispatchers]
    return args


def current_spec(spec: str) -> str:
    """``spec`` with an old sparse path name replaced by its current one (a note on stderr)."""
    name, _, path = spec.partition(":")
    if name == "sparse" and path in DEPRECATED_PATHS:
        print(f"# {spec!r} is deprecated; using 'sparse:{DEPRECATED_PATHS[path]}'", file=sys.stderr)
        return f"sparse:{DEPRECATED_PATHS[path]}"
    return spec


def make_step(module: nn.Module, x: torch.Tensor, mode: str, autocast: Callable[[], contextlib.AbstractContextManager]):
    """A closure running one forward (``fwd``, under no_grad) or forward + backward (``fwdbwd``)."""
    x_grad = x.detach().clone().requires_grad_(mode == "fwdbwd")
    with torch.no_grad(), autocast():
        grad_out = torch.randn_like(module(x))

    def fwd() -> None:
        with torch.no_grad(), autocast():
            module(x)

    def fwdbwd() -> None:
        with autocast():
            y = module(x_grad)
        outputs, grads = [y], [grad_out]
        aux = getattr(module, "last_aux", None)
        if module.training and aux is not None and aux.total.requires_grad:
            outputs.append(aux.total)
            grads.append(None)
        torch.autograd.backward(outputs, grads)
        module.zero_grad(set_to_none=True)
        x_grad.grad = None

    return fwd if mode == "fwd" else fwdbwd


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    batch = args.batch or (16 if cuda else 4)
    channels = args.channels or (256 if cuda else 64)
    size = args.size or (64 if cuda else 32)
    channels_last = cuda if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    autocast_on = dtype != torch.float32

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype, enabled=autocast_on)

    where = machine(device)

    torch.manual_seed(args.seed)
    x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=memory_format)
    dense = nn.Conv2d(channels, channels, args.kernel, padding=args.kernel // 2, device=device)
    dense = dense.to(memory_format=memory_format)

    fastest_dense: dict[str, float] = {}
    if args.retries:  # a reference for "the machine is quiet": the best of a few short timings
        for mode in args.modes:
            step = make_step(dense, x, mode, autocast)
            fastest_dense[mode] = min(interleaved_median_ms({"dense": step}, warmup=2, reps=10, device=device)["dense"]
                                      for _ in range(3))
    for kind, E, k, tokens, spec, mode, phase in itertools.product(args.expert_type, args.experts, args.top_k,
                                                                     args.tokens, args.dispatchers, args.modes,
                                                                     args.phases):
        if k > E:
            continue
        bank = {"experts": kind, "expert_kwargs": {"rank": args.rank} if kind == "lowrank" else {}}
        block = MoEConv2d.from_conv(dense, num_experts=E, top_k=k, tokens=tokens, dispatcher=spec, **bank)
        block = block.to(memory_format=memory_format).train(phase == "train")
        dense.train(phase == "train")
        try:
            steps = {"dense": make_step(dense, x, mode, autocast), "moe": make_step(block, x, mode, autocast)}
        except ValueError as error:  # a forced path that does not apply to these tokens
            print(f"# skip {spec} {tokens}: {error}", file=sys.stderr)
            continue
        medians = interleaved_median_ms(steps, warmup=args.warmup, reps=args.reps, device=device)
        retries = 0
        while retries < args.retries and medians["dense"] > args.noise_tolerance * fastest_dense.get(mode, medians["dense"]):
            time.sleep(args.retry_wait)  # another job is using the cores: wait, then time the case again
            medians = interleaved_median_ms(steps, warmup=args.warmup, reps=args.reps, device=device)
            retries += 1
        fastest_dense[mode] = min(fastest_dense.get(mode, medians["dense"]), medians["dense"])
        path = getattr(block.dispatcher, "path", None)
        if path == "auto":
            split = block.tokens.split(block.geometry.centre_sample(block.geometry.pad(x), tuple(x.shape[-2:])))
            path = block.dispatcher.choose_path(split, block.experts, slots=k)
        write_jsonl(args.out, {
            "bench": "layer", "shape": [batch, channels, size, size], "kernel": args.kernel, "dtype": str(dtype),
            "channels_last": channels_last, "experts": E, "top_k": k, "tokens": tokens, "dispatcher": spec,
            "expert_type": kind, **({"rank": args.rank} if kind == "lowrank" else {}),
            "path": path, "mode": mode, "phase": phase, "dense_ms": round(medians["dense"], 3),
            "moe_ms": round(medians["moe"], 3), "ratio": round(medians["moe"] / medians["dense"], 3),
            "ratio_per_active_expert": round(medians["moe"] / medians["dense"] / k, 3),
            "reps": args.reps, "retries": retries, "machine": where,
        })


if __name__ == "__main__":
    main()
