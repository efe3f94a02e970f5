"""Render benchmark JSON lines as the markdown tables of benchmarks/README.md.

    python benchmarks/report.py results/layer_cpu.jsonl results/models_cpu.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def layer_tables(records: list[dict[str, Any]]) -> str:
    """One table per (mode, phase): MoE / dense-conv time ratios, dense and sparse dispatchers side by side."""
    out = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["mode"], r["phase"]].append(r)
    for (mode, phase), rows in groups.items():
        cells: dict[tuple[int, int, str], dict[str, Any]] = defaultdict(dict)
        for r in rows:
            cells[r["experts"], r["top_k"], r["tokens"]][r["dispatcher"]] = r
        dispatchers = sorted({r["dispatcher"] for r in rows}, key=lambda d: (d != "dense", d))
        header = ["E", "k", "tokens", "dense conv ms"] + [f"{d} ms (ratio)" for d in dispatchers]
        if "dense" in dispatchers and "sparse" in dispatchers:
            header.append("dense disp. / sparse")
        table = []
        for (E, k, tokens), by in sorted(cells.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])):
            first = next(iter(by.values()))
            row = [E, k, tokens, f"{first['dense_ms']:.2f}"]
            for d in dispatchers:
                r = by.get(d)
                path = f" {r['path']}" if r and r.get("path") and d.startswith("sparse") else ""
                row.append(f"{r['moe_ms']:.2f} ({r['ratio']:.2f}x{path})" if r else "-")
            if "dense" in by and "sparse" in by:
                row.append(f"{by['dense']['moe_ms'] / by['sparse']['moe_ms']:.2f}")
            elif len(header) > len(row):
                row.append("-")
            table.append(row)
        out.append(f"**{mode}, {phase}**\n\n" + _table(header, table))
    return "\n\n".join(out)


def model_table(records: list[dict[str, Any]]) -> str:
    header = ["model", "MoE blocks", "params dense / MoE (M)", "GFLOPs dense / active", "latency b1 ms (ratio)",
              "latency bN ms (ratio)", "train step ms (ratio)", "peak step memory MiB dense / MoE"]
    rows = []
    for r in records:
        big = r["batch"]
        memory = next((k[len("dense_"):] for k in r if k.startswith("dense_peak_")), None)
        rows.append([
            r["model"], r["blocks"], f"{r['dense_params'] / 1e6:.2f} / {r['moe_params'] / 1e6:.2f}",
            f"{r['dense_gflops']:.3f} / {r['moe_active_gflops']:.3f}",
            f"{r['dense_latency_b1_ms']:.1f} / {r['moe_latency_b1_ms']:.1f} ({r['latency_b1_ratio']:.2f}x)",
            f"{r[f'dense_latency_b{big}_ms']:.1f} / {r[f'moe_latency_b{big}_ms']:.1f} ({r[f'latency_b{big}_ratio']:.2f}x)",
            f"{r['dense_train_step_ms']:.1f} / {r['moe_train_step_ms']:.1f} ({r['train_step_ratio']:.2f}x)",
            f"{r.get('dense_' + memory)} / {r.get('moe_' + memory)}" if memory else "-",
        ])
    return _table(header, rows)


def main(paths: list[str]) -> None:
    for path in paths:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
        layer = [r for r in records if r.get("bench") == "layer"]
        models = [r for r in records if r.get("bench") == "model"]
        print(f"<!-- {path} -->")
        if layer:
            print(layer_tables(layer))
        if models:
            print(model_table(models))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
