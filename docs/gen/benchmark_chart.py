"""The benchmark page's chart: MoE block / dense conv time ratios from ``benchmarks/results/``.

Run by hand (``python docs/gen/benchmark_chart.py``, or ``python docs/gen/figures.py benchmarks``)
after new results land; it writes ``docs/assets/benchmarks.png``, which ``docs/benchmarks.md`` shows
above the tables. It reads the layer benchmark's JSON lines (``layer_cpu.jsonl``: 2 threads,
``layer_cpu_1thread.jsonl``: 1 thread) and draws the case of the README's targets (4x64x32x32, 3x3,
E=8, top-2, forward+backward in training) per token type and dispatcher, with target 1 (4.0x), and
the sparse dispatcher's ratio against the number of experts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = {"2 threads": "layer_cpu.jsonl", "1 thread": "layer_cpu_1thread.jsonl"}
TOKENS = ("pixel", "grid:3x3", "patch:8", "image")
TARGET_RATIO = 4.0  # benchmarks/README.md, target 1: <= 2 x (k x dense conv) at top-2


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of one results file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ratio(rows: list[dict], **case: object) -> float | None:
    """The ``ratio`` of the one row matching ``case`` (the fastest sparse path if several), or None."""
    found = [row["ratio"] for row in rows if all(row.get(key) == value for key, value in case.items())]
    return min(found) if found else None


def write_chart(path: Path) -> Path:
    """Write the chart as a PNG; returns its path."""
    from convmoe.analysis.plotting import require_matplotlib, save_figure

    plt = require_matplotlib()
    runs = {label: read_rows(RESULTS / name) for label, name in RUNS.items() if (RESULTS / name).is_file()}
    if not runs:
        raise FileNotFoundError(f"no layer results in {RESULTS} ({', '.join(RUNS.values())})")
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(11.5, 3.4), layout="constrained", gridspec_kw={"width_ratios": [5, 3]}
    )
    bars = [(dispatcher, label) for dispatcher in ("sparse", "dense") for label in runs]
    width = 0.8 / len(bars)
    colors = {
        ("sparse", "2 threads"): "#3f51b5",
        ("sparse", "1 thread"): "#9fa8da",
        ("dense", "2 threads"): "#ff7043",
        ("dense", "1 thread"): "#ffccbc",
    }
    case = {"experts": 8, "top_k": 2, "mode": "fwdbwd", "phase": "train"}
    for i, (dispatcher, label) in enumerate(bars):
        values = [ratio(runs[label], dispatcher=dispatcher, tokens=tokens, **case) for tokens in TOKENS]
        offsets = [t + (i - (len(bars) - 1) / 2) * width for t in range(len(TOKENS))]
        drawn = left.bar(
            offsets,
            [v or 0 for v in values],
            width,
            color=colors.get((dispatcher, label)),
            label=f"{dispatcher} dispatcher, {label}",
        )
        left.bar_label(drawn, labels=[f"{v:.1f}" if v else "" for v in values], fontsize=6, padding=1)
    left.axhline(
        TARGET_RATIO, color="black", linestyle="--", linewidth=1, label=f"target 1 ({TARGET_RATIO:.1f}x)"
    )
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_xticks(range(len(TOKENS)), TOKENS)
    left.set_ylabel("MoE block / dense conv time")
    left.set_title("E=8, top-2, forward+backward, training", fontsize=9)
    left.legend(fontsize=7, frameon=False, ncols=2)
    left.set_ylim(0, left.get_ylim()[1] * 1.15)
    label = "1 thread" if "1 thread" in runs else next(iter(runs))
    for tokens, marker in zip(TOKENS, "osD^", strict=True):
        for top_k, style in ((1, "-"), (2, "--")):
            experts = sorted({row["experts"] for row in runs[label]})
            values = [
                ratio(
                    runs[label],
                    dispatcher="sparse",
                    tokens=tokens,
                    experts=e,
                    top_k=top_k,
                    mode="fwd",
                    phase="eval",
                )
                for e in experts
            ]
            right.plot(
                experts,
                values,
                style,
                marker=marker,
                markersize=4,
                label=f"{tokens}, top-{top_k}" if top_k == 1 else None,
                color=plt.get_cmap("tab10")(TOKENS.index(tokens)),
            )
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xscale("log", base=2)
    right.set_xticks(experts, [str(e) for e in experts])
    right.set_xlabel("experts E")
    right.set_ylabel("sparse MoE / dense conv time")
    right.set_title(f"sparse dispatcher, forward, eval, {label} (solid top-1, dashed top-2)", fontsize=9)
    right.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    first = next(iter(runs.values()))[0]
    shape = "x".join(str(s) for s in first["shape"])
    figure.suptitle(
        f"Layer benchmark: {shape}, {first['kernel']}x{first['kernel']} conv, "
        f"{first['machine']['cpu']} CPU, torch {first['machine']['torch'].split('+')[0]} "
        f"(benchmarks/results/layer_cpu*.jsonl)",
        fontsize=9,
    )
    return save_figure(figure, path, dpi=80)


if __name__ == "__main__":
    out = write_chart(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "assets" / "benchmarks.png")
    print(f"{out}: {out.stat().st_size / 1000:.0f} kB")
