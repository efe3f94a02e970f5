"""Train the arms of a study (recipes x seeds) and summarise metric, balance and dead experts per arm.

A study is a YAML file (``benchmarks/studies/*.yaml``)::

    runs_root: runs/study_cheap_capacity_cifar10      # where the run folders go (not committed)
    results: benchmarks/results/study_cheap_capacity_cifar10.json
    seeds: [0, 1, 2]
    arms:
      dense: {config: configs/cpu/cifar10_efficientnet_lite0_dense.yaml}
      lowrank_bias: {config: configs/cpu/cifar10_efficientnet_lite0_lowrank.yaml,
                     overrides: ["model.moe_config.losses={}", "model.moe_config.bias_balancing=0.001"]}

Runs go seed-major (every arm of seed 0, then seed 1, ...), so an interrupted queue leaves comparable
arms; a run already in the results file is not run again (commit the file: it survives a new machine,
the run folders do not); each run is ``convmoe train CONFIG trainer.seed=S trainer.default_root_dir=ROOT/ARM/seedS
trainer.resume=auto OVERRIDES`` (``{seed}`` in an override becomes S, e.g. ``+init_from=runs/dense/seed{seed}/checkpoints/best.pt``)
and a finished run is skipped. The summary (written after every run)
holds, per run, the best epoch's headline metrics and, from the same row of ``metrics.csv``, each MoE
layer's training-epoch imbalance (busiest expert's load over the mean) and dead experts, and the summed
training-epoch times (``epoch_seconds``, validation excluded); per arm, the mean and sample standard deviation over seeds.

    python benchmarks/training_study.py benchmarks/studies/cheap_capacity_cifar10.yaml
    python benchmarks/training_study.py benchmarks/studies/cheap_capacity_cifar10.yaml --summary-only
    python benchmarks/training_study.py benchmarks/studies/cheap_capacity_cifar10.yaml --markdown   # the table

Two invocations with different ``--arms`` or ``--seeds`` may run side by side (e.g. one thread each on a 2-core
machine): each merges its runs into the results file as it is when it writes.

With ``input_size: [H, W]`` in the study, each arm's active and executed FLOPs (``convmoe.flops``, one
image, eval) are counted on its recipe's model and given as ratios to the first arm's.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from convmoe.zoo.runs import read_run


def _finished(run_dir: Path) -> bool:
    return (run_dir / "DONE").exists()  # written after the run's process ended without error


def _overrides(arm: dict[str, Any], seed: int) -> list[str]:
    """The arm's overrides for one seed: ``{seed}`` replaced (only that; YAML flow mappings keep their braces)."""
    return [str(o).replace("{seed}", str(seed)) for o in arm.get("overrides", [])]


def _train(config: str, overrides: list[str], run_dir: Path, seed: int, log: Path) -> None:
    command = ["convmoe", "train", config, f"trainer.seed={seed}", f"trainer.default_root_dir={run_dir}",
               "trainer.resume=auto", "trainer.enable_progress_bar=false", *overrides]
    with open(log, "a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)
    (run_dir / "DONE").write_text("finished\n")


def _epoch_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` that belong to an epoch."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("epoch") not in (None, "")]


def _epoch_seconds(rows: list[dict[str, str]]) -> float | None:
    """Sum of the training epochs' times (``time/epoch_s``): whole even when the run was resumed."""
    times = {int(float(row["epoch"])): float(row["time/epoch_s"]) for row in rows
             if row.get("time/epoch_s") not in (None, "")}
    return sum(times.values()) if times else None


def _routing(rows: list[dict[str, str]], epoch: int) -> dict[str, Any]:
    rows = [row for row in rows if int(float(row["epoch"])) == epoch]
    row = {key: value for r in rows for key, value in r.items() if value not in (None, "")}  # Lightning logs one row per logging call
    layers: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "routing" and parts[2] in ("imbalance", "dead_experts") and value:
            layers.setdefault(parts[1], {})[parts[2]] = float(value)
    if not layers:  # no per-layer tracker in this run: the per-batch means of the training epoch
        if row.get("routing/train_imbalance_mean"):
            return {"imbalance_mean": float(row["routing/train_imbalance_mean"]),
                    "imbalance_max": float(row["routing/train_imbalance_max"]),
                    "dead_experts": float(row.get("routing/train_dead_experts") or 0), "per_batch": True}
        return {}
    return {"imbalance_mean": statistics.fmean(v["imbalance"] for v in layers.values()),
            "imbalance_max": max(v["imbalance"] for v in layers.values()),
            "dead_experts": int(sum(v.get("dead_experts", 0) for v in layers.values())), "layers": len(layers)}


def _run_summary(arm: str, seed: int, run_dir: Path) -> dict[str, Any]:
    record, rows = read_run(run_dir), _epoch_rows(run_dir)
    seconds = _epoch_seconds(rows)
    return {"arm": arm, "seed": seed, "run_dir": str(run_dir), "best_epoch": record.best_epoch,
            "metrics": record.headline(), **_routing(rows, record.best_epoch),
            **({"epoch_seconds": round(seconds, 1)} if seconds is not None else {})}


def _mean_std(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: mean and sample std over seeds of every metric, the imbalance and the dead experts."""
    arms: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(run["arm"] for run in runs):
        mine = [run for run in runs if run["arm"] == arm]
        keys = dict.fromkeys(key for run in mine for key in run["metrics"])
        summary = {key: _mean_std([run["metrics"][key] for run in mine if key in run["metrics"]]) for key in keys}
        for key in ("imbalance_mean", "imbalance_max", "dead_experts"):
            values = [run[key] for run in mine if key in run]
            if values:
                summary[key] = _mean_std(values)
        arms[arm] = summary
    return arms


def arm_flops(arms: dict[str, Any], input_size: list[int]) -> dict[str, dict[str, float]]:
    """Active and executed FLOPs of one eval forward of every arm's model (random weights), at ``input_size``."""
    import torch

    import convmoe
    from convmoe.engine import load_config
    from convmoe.engine.model_build import build_model

    counts: dict[str, dict[str, float]] = {"active": {}, "executed": {}}
    for name, arm in arms.items():
        config = load_config(arm["config"], _overrides(arm, 0))
        model = build_model(config, pretrained=False).eval()  # the recipe's model and patch, random weights
        report = convmoe.flops(model, torch.zeros(1, 3, *input_size))
        counts["active"][name], counts["executed"][name] = float(report.active), float(report.executed)
    return counts


def markdown(payload: dict[str, Any]) -> str:
    """The study's summary as a Markdown table: metric, FLOPs ratio, imbalance and dead experts per arm."""
    summary, flops, executed = payload["summary"], payload.get("active_flops", {}), payload.get("executed_flops", {})
    metrics = list(dict.fromkeys(key for arm in summary.values() for key in arm if "/" in key))
    first = next(iter(flops.values()), None)
    first_executed = next(iter(executed.values()), None)

    def cell(stats: dict[str, Any] | None, digits: int) -> str:
        if not stats:
            return "-"
        std = f" ± {stats['std']:.{digits}f}" if stats["std"] is not None else ""
        return f"{stats['mean']:.{digits}f}{std}"

    head = ["arm", "seeds", *metrics, "active FLOPs", *(["executed FLOPs"] if executed else []),
            "imbalance (mean over layers)", "dead experts"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, stats in summary.items():
        seeds = max((s["n"] for s in stats.values() if isinstance(s, dict) and "n" in s), default=0)
        ratio = f"{flops[name] / first:.3f}x" if first and name in flops else "-"
        ran = [f"{executed[name] / first_executed:.3f}x" if first_executed and name in executed else "-"] if executed else []
        digits = [4 if "miou" in m else 2 for m in metrics]
        rows.append("| " + " | ".join([f"`{name}`", str(seeds), *(cell(stats.get(m), d) for m, d in zip(metrics, digits, strict=True)),
                                       ratio, *ran, cell(stats.get("imbalance_mean"), 2), cell(stats.get("dead_experts"), 1)])
                    + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--summary-only", action="store_true", help="summarise the finished runs, train nothing")
    parser.add_argument("--arms", nargs="*", help="only these arms")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these of the study's seeds")
    parser.add_argument("--markdown", action="store_true", help="print the results file's table and stop")
    args = parser.parse_args(argv)
    study = yaml.safe_load(args.study.read_text())
    root, results = Path(study["runs_root"]), Path(study["results"])
    if args.markdown:
        print(markdown(json.loads(results.read_text())))
        return 0
    arms = {name: arm for name, arm in study["arms"].items() if not args.arms or name in args.arms}
    old = {(r["arm"], r["seed"]): r for r in json.loads(results.read_text())["runs"]} if results.exists() else {}
    runs: dict[tuple[str, int], dict[str, Any]] = dict(old)
    for seed in (s for s in study["seeds"] if not args.seeds or s in args.seeds):
        for name, arm in arms.items():
            run_dir = root / name / f"seed{seed}"
            if (name, seed) in old:  # summarised already (its run folder may be on another machine)
                continue
            if not _finished(run_dir):
                if args.summary_only:
                    continue
                run_dir.mkdir(parents=True, exist_ok=True)
                print(f"training {name} seed {seed} -> {run_dir}", flush=True)
                try:
                    _train(arm["config"], _overrides(arm, seed), run_dir, seed, root / "train.log")
                except subprocess.CalledProcessError as error:  # the next invocation resumes it
                    print(f"FAILED {name} seed {seed} (exit {error.returncode}); see {root / 'train.log'}", flush=True)
                    continue
            runs[name, seed] = _run_summary(name, seed, run_dir)
            _write(results, study, args.study, list(runs.values()))
    _write(results, study, args.study, list(runs.values()))
    print(json.dumps(summarize(list(runs.values())), indent=1))
    return 0


def _write(results: Path, study: dict[str, Any], path: Path, runs: list[dict[str, Any]]) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(results.read_text()) if results.exists() else {}
    # Another invocation (``--arms`` of the same study, in parallel) may have added runs since this one started.
    merged = {(r["arm"], r["seed"]): r for r in old.get("runs", [])} | {(r["arm"], r["seed"]): r for r in runs}
    order = {name: i for i, name in enumerate(study["arms"])}
    runs = sorted(merged.values(), key=lambda r: (order.get(r["arm"], len(order)), r["seed"]))
    payload = {"study": str(path), "command": f"python benchmarks/training_study.py {path}",
               "arms": {name: arm for name, arm in study["arms"].items()}, "runs": runs, "summary": summarize(runs)}
    if "input_size" in study:
        payload["input_size"] = study["input_size"]
        counted = set(old.get("active_flops") or {}) & set(old.get("executed_flops") or {})
        if counted >= set(study["arms"]):  # every arm counted already (an arm added or renamed: count again)
            payload["active_flops"], payload["executed_flops"] = old["active_flops"], old["executed_flops"]
        else:
            counts = arm_flops(study["arms"], study["input_size"])
            payload["active_flops"], payload["executed_flops"] = counts["active"], counts["executed"]
    results.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
