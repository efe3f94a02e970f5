"""Benchmark scripts that report ratios the docs quote: they run, and what they record is what they measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import convmoe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_checkpoints
import bench_image_paths


def _image_folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.random.default_rng(c * 10 + i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:04d}.png")
    return root


def test_bench_checkpoints_times_saved_models_against_the_first(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = timm.create_model("test_efficientnet", num_classes=2)
    moe = convmoe.patch(timm.create_model("test_efficientnet", num_classes=2), targets="conv_head",
                        config={"num_experts": 4, "top_k": 1, "tokens": "image"})
    sources = [str(convmoe.save_pretrained(model, tmp_path / name)) for name, model in (("dense", dense), ("moe", moe))]
    out = tmp_path / "out.jsonl"
    bench_checkpoints.main([*sources, "--images", str(_image_folder(tmp_path / "images")), "--size", "32",
                            "--batch", "4", "--freeze", "conv_stem", "--warmup", "0", "--reps", "1",
                            "--out", str(out)])
    baseline, patched = (json.loads(line) for line in out.read_text().splitlines())
    assert (baseline["source"], patched["source"]) == tuple(sources)
    assert baseline["train_step_ratio"] == baseline["latency_b4_ratio"] == 1.0
    assert baseline["experts_used_at_batch"] is None
    assert 1 <= patched["experts_used_at_batch"] <= 4
    assert patched["latency_b1_ratio"] == pytest.approx(patched["latency_b1_ms"] / baseline["latency_b1_ms"], rel=0.01)


def test_bench_checkpoints_refuses_a_folder_without_classes_or_too_few_images(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"has no class folders; expected .*<class>/<image>\. Point --images to an "
                                         r"image-folder split\.$"):
        bench_checkpoints.image_batch(tmp_path, 4, 32)
    with pytest.raises(SystemExit, match="holds 6 images, fewer than the batch of 8; lower --batch"):
        bench_checkpoints.image_batch(_image_folder(tmp_path / "images"), 8, 32)


def test_bench_image_paths_records_every_path_in_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench_image_paths.SHAPES, 1, [(8, 16, 3)])
    out = tmp_path / "out.jsonl"
    bench_image_paths.main(["--kernel", "1", "--train", "--batches", "2", "--reps", "1", "--out", str(out)])
    (record,) = (json.loads(line) for line in out.read_text().splitlines())
    assert (record["kernel"], record["mode"], record["c_in"], record["c_out"], record["batch"]) == (1, "train", 8, 16, 2)
    assert all(record[f"{path}_ratio"] > 0 for path in bench_image_paths.PATHS)


def test_bench_image_paths_runs_channels_last_on_the_small_maps_only(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench_image_paths.SHAPES, 1, [(8, 16, 3), (8, 16, 9)])
    out = tmp_path / "out.jsonl"
    bench_image_paths.main(["--kernel", "1", "--channels-last", "--max-side", "7", "--batches", "1", "--reps", "1",
                            "--out", str(out)])
    (record,) = (json.loads(line) for line in out.read_text().splitlines())
    assert (record["size"], record["channels_last"], record["mode"]) == (3, True, "inference")
