"""DistributedDataParallel: MoE blocks need no find_unused_parameters, and a 2-process torchrun (gloo) run."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from convmoe import MoEConv2d
from convmoe.engine import evaluate, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_engine import segmentation_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class UnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_experts_without_tokens_get_zero_gradients_under_ddp(process_group):
    # The check itself: DDP without find_unused_parameters fails on a parameter that gets no gradient.
    broken = DistributedDataParallel(UnusedBranch())
    broken(torch.randn(3, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="finished reduction"):
        broken(torch.randn(3, 2))

    # An MoE block whose router sends every token to expert 0: experts 1..3 get no token, yet the
    # expert bank is one parameter, so they get a zero gradient and DDP needs no unused-parameter scan.
    block = MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=1)
    with torch.no_grad():
        block.router.gate.proj.weight.zero_()
        block.router.gate.proj.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    model = DistributedDataParallel(block)
    for _ in range(3):
        model(torch.randn(2, 4, 5, 5)).sum().backward()
    assert block.last_routing.expert_load().tolist() == [50.0, 0.0, 0.0, 0.0]
    per_expert = block.experts.weight.grad.flatten(1).abs().sum(1)
    assert per_expert[0] > 0
    assert per_expert[1:].eq(0).all()


def test_torchrun_two_processes_gloo(tmp_path):
    config = segmentation_config(tmp_path / "run")
    config["model"]["_target_"] = "convmoe.models.UPerNetMEDoE"
    config["model"]["moe_num_experts"] = 8
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "convmoe.engine", str(path)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("best val/miou=") == 1  # only rank 0 reports and writes
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    # 4 crops per epoch shared by 2 processes at batch 2: one optimizer step each.
    assert int(row["step"]) == 1
    assert row["extra/train_medoe_expert_utilization"] != ""
    # Validation shards the 2 images over the processes and sums the confusion matrices: the
    # result equals a single-process evaluation of the saved weights.
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert load_checkpoint(best)["epoch"] == 0
    metrics = evaluate(best, progress=False)
    assert metrics["miou"] == pytest.approx(float(row["val/miou"]), abs=1e-6)
