"""The engine's ``trainer.channels_last``: channels-last weights and batches, the same training numbers."""

from __future__ import annotations

import pytest
import torch
from test_engine import classification_config, segmentation_config

from convmoe.engine import Trainer, evaluate

MOE = {"moe_targets": "last_stage", "moe_config": {"num_experts": 4, "top_k": 2, "tokens": "pixel"}}


def fit(config: dict, trainer_key: str, channels_last: bool) -> tuple[Trainer, dict]:
    config[trainer_key]["channels_last"] = channels_last
    trainer = Trainer(config)
    seen: list[bool] = []
    trainer.model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    result = trainer.fit()
    return trainer, {"seen": seen, "row": result.history[-1], "best": result.best_checkpoint}


@pytest.mark.parametrize(("build", "trainer_key", "monitor", "model"), [
    (classification_config, "trainer", "val/top1", MOE),
    (segmentation_config, "pl_trainer", "val/miou", {}),
], ids=["classification-moe", "segmentation-upernet-moe"])
def test_channels_last_trains_to_the_same_numbers(tmp_path, build, trainer_key, monitor, model):
    _, plain = fit(build(tmp_path / "plain", **model), trainer_key, channels_last=False)
    trainer, last = fit(build(tmp_path / "last", **model), trainer_key, channels_last=True)
    assert last["seen"]
    assert all(last["seen"])  # every training and evaluation batch, channels-last
    assert not any(plain["seen"])
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # The layouts sum in different orders, and the kernels do so differently with 1 or 2 threads: after an epoch of
    # training the mean loss agrees to about 1e-4 (2 threads) or 1.3e-4 (OMP_NUM_THREADS=1), a layout bug by far more.
    assert last["row"]["train/loss"] == pytest.approx(plain["row"]["train/loss"], rel=1e-3)
    assert last["row"][monitor] == pytest.approx(plain["row"][monitor], abs=1e-3)
    metric = evaluate(last["best"], progress=False)  # eval runs the plain layout and reproduces the run
    assert metric[monitor.split("/")[1]] == pytest.approx(last["row"][monitor], abs=1e-3)
