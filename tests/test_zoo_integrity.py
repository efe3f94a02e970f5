"""Cards pin the sha256 of their weights: a byte flipped inside a tensor keeps the file's size and still
loads, so only the hash tells; ``convmoe zoo check`` recomputes it. Runs on copies of the real zoo/ variants."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from convmoe.atomic_files import file_sha256
from convmoe.cli import main
from convmoe.zoo import check_variant, check_zoo, split_front_matter, validate_metadata
from convmoe.zoo.card import EXAMPLE_META
from convmoe.zoo.schema import variant_folders

ZOO = Path(__file__).resolve().parents[1] / "zoo"
SMALLEST = min(variant_folders(ZOO), key=lambda folder: (folder / "model.safetensors").stat().st_size, default=None)
needs_a_variant = pytest.mark.skipif(SMALLEST is None, reason="zoo/ holds no variant yet")


def card_meta(folder: Path) -> dict:
    return split_front_matter((folder / "README.md").read_text(encoding="utf-8"), str(folder))[0]["convmoe"]


def flip_a_tensor_byte(weights: Path) -> None:
    """Flip one bit in the middle of the tensor data (after the safetensors header); the size stays."""
    data = bytearray(weights.read_bytes())
    (header_bytes,) = struct.unpack("<Q", data[:8])
    start = 8 + header_bytes
    data[start + (len(data) - start) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


@pytest.fixture
def zoo_copy(tmp_path: Path) -> Path:
    """A zoo of the smallest real variant and the variants it names (its dense twin, or the MoE variants it is
    the twin of), with its own index written by `convmoe zoo table`."""
    zoo_dir = tmp_path / "zoo"
    meta = card_meta(SMALLEST)
    for model_id in [SMALLEST.name, *([meta["dense_model_id"]] if meta.get("dense_model_id") else []),
                     *meta.get("moe_model_ids", [])]:
        shutil.copytree(ZOO / model_id, zoo_dir / model_id)
    assert main(["zoo", "table", "--zoo-dir", str(zoo_dir)]) == 0
    return zoo_dir


@pytest.mark.parametrize("folder", variant_folders(ZOO), ids=lambda folder: folder.name)
def test_every_real_card_and_config_pin_the_weights_sha256(folder):
    digest = file_sha256(folder / "model.safetensors")
    assert card_meta(folder)["weights"]["sha256"] == digest
    assert json.loads((folder / "config.json").read_text())["weights_sha256"] == digest


@needs_a_variant
def test_untouched_copy_passes_and_a_flipped_byte_is_reported(zoo_copy, capsys):
    folder = zoo_copy / SMALLEST.name
    weights = folder / "model.safetensors"
    assert check_zoo(zoo_copy, load=False) == []
    size = weights.stat().st_size
    flip_a_tensor_byte(weights)
    assert weights.stat().st_size == size
    problems = check_variant(folder, load=False)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{weights} has sha256 {file_sha256(weights)}, the card records ")
    assert "Restore the published file" in problems[0]
    capsys.readouterr()
    assert main(["zoo", "check", "--zoo-dir", str(zoo_copy), "--no-load"]) == 1
    out = capsys.readouterr().out
    assert f"{weights} has sha256" in out
    assert f"{len(variant_folders(zoo_copy))} variant(s), 1 problem(s)" in out


@needs_a_variant
def test_config_json_hash_from_another_publish_is_reported(zoo_copy):
    folder = zoo_copy / SMALLEST.name
    config = folder / "config.json"
    config.write_text(config.read_text().replace(file_sha256(folder / "model.safetensors"), "0" * 64))
    problems = check_variant(folder, load=False)
    assert any(problem.startswith(f"{config} records weights_sha256 {'0' * 64}") for problem in problems), problems


@pytest.mark.parametrize("sha256", [None, "ABC", "g" * 64])
def test_the_schema_requires_a_sha256_of_64_hex_digits(sha256):
    weights = {key: value for key, value in EXAMPLE_META["weights"].items() if key != "sha256"}
    if sha256 is not None:
        weights["sha256"] = sha256
    problems = validate_metadata({**EXAMPLE_META, "weights": weights}, "tiny-moe")
    assert len(problems) == 1
    assert problems[0].startswith("convmoe.weights is ")
    assert "sha256 (64 lower-case hex digits) of model.safetensors" in problems[0]


def test_zoo_check_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["zoo", "check", "--zoo-dir", str(tmp_path / "no" / "such")]) == 2
    err = capsys.readouterr().err
    assert err == (f"convmoe zoo check: error: zoo folder {tmp_path / 'no' / 'such'} does not exist; pass --zoo-dir "
                   "with the folder holding the variants (default: zoo, run from the repository root).\n")
