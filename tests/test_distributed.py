"""Data parallelism: patched models under DDP (find_unused_parameters=False) and FSDP, 2 CPU processes on gloo.

One pair of processes runs every check (process start-up dominates the cost); each check records
its measurements in a JSON file and the tests below assert on them. Every rank also builds the
single-process reference from the same seed, so no tensor has to travel back to the parent.

References (see ``convmoe.distributed``):
- task loss only: DDP gradients equal one process training on the global batch;
- task + aux loss: aux losses are per rank, so DDP gradients equal one process averaging
  ``task + aux`` over the two halves of the global batch.
"""

from __future__ import annotations

import copy
import json
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import convmoe
from convmoe import MoEConfig
from convmoe.diagnostics import compute_stats
from convmoe.distributed import global_batch, global_routing_stats
from convmoe.losses import first_choice_counts
from convmoe.routers.bias_balancing import bias_update, dispatched_load

WORLD = 2
LOCAL_BATCH = 2
UNUSED_EXPERT = 3


def _model(config: MoEConfig, seed: int = 0) -> nn.Module:
    """conv (MoE, pixel tokens, crafted gate) -> ReLU -> conv (MoE, ``config``) -> ReLU -> pool -> linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    # Large aux weights: the per-rank and global-batch aux losses then give clearly different gradients.
    convmoe.patch(model, targets=["0"], config=MoEConfig(num_experts=4, top_k=2, losses={"switch": 0.5}), upcycle=False)
    convmoe.patch(model, targets=["2"], config=config, upcycle=False)
    with torch.no_grad():
        # Expert 3 of block "0" wins the pixels whose channel 0 is > 0.5 and loses the others.
        gate = model[0].router.gate.proj
        gate.weight.normal_(0, 0.1)
        gate.bias.zero_()
        gate.weight[UNUSED_EXPERT] = torch.tensor([30.0, 0.0, 0.0])
        gate.bias[UNUSED_EXPERT] = -15.0
    return model


def _batch(seed: int, first_expert_3_on_rank_1: bool) -> tuple[Tensor, Tensor]:
    """Global batch (WORLD * LOCAL_BATCH); channel 0 < 0 everywhere, except on rank 1's half when asked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * LOCAL_BATCH, 3, 7, 7, generator=g)
    x[:, 0] = -(0.5 + x[:, 0].abs())
    if first_expert_3_on_rank_1:
        x[LOCAL_BATCH:, 0] = 1.0 + x[LOCAL_BATCH:, 0].abs()
    return x, torch.randint(0, 5, (WORLD * LOCAL_BATCH,), generator=g)


def _loss(model: nn.Module, x: Tensor, y: Tensor, with_aux: bool) -> Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    return loss + convmoe.aux_loss(model) if with_aux else loss


def _reference_grads(model: nn.Module, x: Tensor, y: Tensor, with_aux: bool) -> dict[str, Tensor]:
    """One process: the global batch (task loss), or the mean of the per-rank losses (with aux)."""
    model.zero_grad()
    if with_aux:
        halves = zip(x.split(LOCAL_BATCH), y.split(LOCAL_BATCH), strict=True)
        loss = torch.stack([_loss(model, xs, ys, True) for xs, ys in halves]).mean()
    else:
        loss = _loss(model, x, y, False)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _max_diff(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    return max(float((grads[name] - reference[name]).abs().max()) for name in reference)


def _expert_load(model: nn.Module, block: str) -> list[float]:
    routing = dict(convmoe.moe_blocks(model))[block].last_routing
    return routing.expert_load().tolist()


def _check_ddp_unused_expert(rank: int) -> dict[str, Any]:
    """Expert 3 of block "0" gets no token on rank 0 (step 1) and on both ranks (steps 2, 3)."""
    model = _model(MoEConfig(num_experts=4, top_k=2, tokens="grid:3x3", losses={"importance": 0.5}))
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    out: dict[str, Any] = {"diffs": [], "loads": []}
    for step, (on_rank_1, with_aux) in enumerate([(True, False), (False, False), (False, True)]):
        x, y = _batch(seed=step, first_expert_3_on_rank_1=on_rank_1)
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        optimizer.zero_grad()
        _loss(ddp, x[local], y[local], with_aux).backward()
        out["loads"].append(_expert_load(ddp, "module.0"))
        grads = {name.removeprefix("module."): p.grad for name, p in ddp.named_parameters()}
        out["diffs"].append(_max_diff(grads, _reference_grads(reference, x, y, with_aux)))
        if step == 0:
            stats = global_routing_stats(ddp)  # the reference just routed the global batch (task loss only)
            expected = {name: compute_stats(block.last_routing) for name, block in convmoe.moe_blocks(reference)}
            out["stats"] = {name.removeprefix("module."): s.as_dict() for name, s in stats.blocks.items()}
            out["expected_stats"] = {name: s.as_dict() for name, s in expected.items()}
            out["local_stats"] = convmoe.routing_stats(ddp)["module.0"].as_dict()
        optimizer.step()
        reference_optimizer.step()
    out["param_diff"] = max(float((p.detach() - q.detach()).abs().max())
                            for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    return out


CONFIGS = {
    "pixel-token_choice": MoEConfig(num_experts=4, top_k=2, tokens="pixel", losses={"switch": 0.5}),
    "grid-expert_choice": MoEConfig(num_experts=4, top_k=1, tokens="grid:3x3", router="expert_choice"),
    "patch-positional-capacity": MoEConfig(num_experts=4, top_k=1, tokens="patch:2", router="positional",
                                           losses={"switch": 0.5, "z": 0.05}),
    "image-capacity-dense": MoEConfig(num_experts=4, top_k=1, tokens="image", capacity_factor=1.0,
                                      dispatcher="dense"),
    "residual-experts": MoEConfig(num_experts=4, top_k=1, tokens="grid:2x2", experts="residual"),
}


def _check_ddp_configs(rank: int) -> dict[str, Any]:
    out = {}
    for name, config in CONFIGS.items():
        model = _model(config)
        reference = copy.deepcopy(model)
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        x, y = _batch(seed=10, first_expert_3_on_rank_1=False)
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        diffs = []
        for _ in range(2):  # a second step fails if the first left a parameter without a gradient
            ddp.zero_grad()
            _loss(ddp, x[local], y[local], True).backward()
            grads = {n.removeprefix("module."): p.grad for n, p in ddp.named_parameters()}
            diffs.append(_max_diff(grads, _reference_grads(reference, x, y, True)))
        out[name] = max(diffs)
    return out


def _check_ddp_expert_dropout(rank: int) -> dict[str, Any]:
    """MEDoE removes experts per pass: they get no token but still a (zero) gradient slice."""
    model = _model(MoEConfig(num_experts=4, top_k=1, dropout="medoe", drop_rate=0.5))
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    x, y = _batch(seed=20, first_expert_3_on_rank_1=False)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    kept = []
    for _ in range(3):
        ddp.zero_grad()
        _loss(ddp, x[local], y[local], True).backward()
        kept.append(int(dict(convmoe.moe_blocks(ddp))["module.2"].last_routing.expert_mask.sum()))
    finite = all(bool(p.grad.isfinite().all()) for p in ddp.parameters())
    return {"kept": kept, "finite": finite}


def _check_fsdp(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = _model(MoEConfig(num_experts=4, top_k=2, tokens="grid:3x3"))
    reference = copy.deepcopy(model)
    for block in (model[0], model[2]):
        fully_shard(block)
    fully_shard(model)
    x, y = _batch(seed=30, first_expert_3_on_rank_1=True)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    _loss(model, x[local], y[local], True).backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    sharded = type(model[0].experts.weight).__name__
    local_rows = model[0].experts.weight.to_local().shape[0]
    return {"diff": _max_diff(grads, _reference_grads(reference, x, y, True)), "type": sharded,
            "local_expert_rows": local_rows}


def _bias_block() -> nn.Module:
    """An MoE block with bias balancing whose expert 3 wins the pixels with channel 0 > 0.5 (as block "0")."""
    torch.manual_seed(0)
    block = convmoe.MoEConv2d(3, 4, 1, num_experts=4, top_k=1, bias_balancing=0.01)
    with torch.no_grad():
        block.router.gate.proj.weight.normal_(0, 0.1)
        block.router.gate.proj.bias.zero_()
        block.router.gate.proj.weight[UNUSED_EXPERT] = torch.tensor([30.0, 0.0, 0.0])
        block.router.gate.proj.bias[UNUSED_EXPERT] = -15.0
    return block.train()


def _check_bias_balancing(rank: int) -> dict[str, Any]:
    """Without DDP (no buffer broadcast) each rank routes its half of the global batch, expert 3 only on
    rank 1; the loads are summed over ranks, so the bias follows one process on the global batch."""
    model, reference = _bias_block(), _bias_block()
    out: dict[str, Any] = {"bias": [], "reference": [], "local_update": []}
    for step in range(3):
        x, _ = _batch(seed=step, first_expert_3_on_rank_1=True)
        model(x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH])
        reference(x)
        out["local_update"].append(bias_update(dispatched_load(model.last_routing), 0.01).tolist())
        out["bias"].append(model.router.expert_bias.tolist())
        out["reference"].append(reference.router.expert_bias.tolist())
    out["stats_bias"] = global_routing_stats(model)[""].expert_bias
    return out


def _switch_block(losses: dict[str, float]) -> nn.Module:
    """The block of ``_bias_block`` (expert 3 wins where channel 0 > 0.5), with ``losses`` and no bias."""
    torch.manual_seed(0)
    block = convmoe.MoEConv2d(3, 4, 1, num_experts=4, top_k=1, losses=losses)
    with torch.no_grad():
        block.router.gate.proj.weight[UNUSED_EXPERT] = torch.tensor([30.0, 0.0, 0.0])
        block.router.gate.proj.bias[UNUSED_EXPERT] = -15.0
    return block


def _aux_step(model: nn.Module, x: Tensor) -> tuple[float, list[float]]:
    """One backward of the output's mean plus the aux loss; the aux loss and the gate's weight gradient.

    (DDP reduces gradients only in a backward pass that reaches the model's output.)
    """
    model.zero_grad()
    output = model(x).mean()
    aux = convmoe.aux_loss(model)
    (output + aux).backward()
    loss = aux.detach()
    weight = model.module.router.gate.proj.weight if isinstance(model, DistributedDataParallel) else (
        model.router.gate.proj.weight)
    return float(loss), weight.grad.flatten().tolist()


def _check_global_switch(rank: int) -> dict[str, Any]:
    """Expert 3 wins only on rank 1's half: the global switch loss sees the global frequencies."""
    x, _ = _batch(seed=5, first_expert_3_on_rank_1=True)
    local = x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
    out: dict[str, Any] = {}
    ddp = DistributedDataParallel(_switch_block({"switch_global": 1.0}))
    out["aux"], out["grad"] = _aux_step(ddp, local)
    out["reference_aux"], out["reference_grad"] = _aux_step(_switch_block({"switch": 1.0}), x)
    _, out["local_switch_grad"] = _aux_step(DistributedDataParallel(_switch_block({"switch": 1.0})), local)
    # gradient accumulation: micro-batches of one image; the window ends with the global batch's frequencies
    block = _switch_block({"switch_global": 1.0})
    with global_batch(block):
        losses = []
        for image in local.split(1):
            block(image)
            losses.append(float(convmoe.aux_loss(block)))
            probs = block.last_routing.probs
        window = block.balancing.window
        out["window_counts"], out["window_tokens"] = window.counts.tolist(), float(window.tokens)
    out["last_loss"] = losses[-1]
    out["last_loss_expected"] = float(4 * (window.counts / window.tokens * probs.reshape(-1, 4).mean(0).double()).sum())
    reference = _switch_block({"switch": 1.0})
    reference(x)
    out["expected_counts"] = first_choice_counts(reference.last_routing.probs, 4).tolist()
    return out


CHECKS: dict[str, Callable[[int], dict[str, Any]]] = {
    "ddp_unused_expert": _check_ddp_unused_expert,
    "ddp_configs": _check_ddp_configs,
    "ddp_expert_dropout": _check_ddp_expert_dropout,
    "fsdp": _check_fsdp,
    "bias_balancing": _check_bias_balancing,
    "global_switch": _check_global_switch,
}


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        for name, check in CHECKS.items():
            try:
                results[name] = {"ok": True, **check(rank)}
            except Exception:  # noqa: BLE001 - recorded: the test of this check shows the traceback
                results[name] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
    finally:
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    """Run every check once in 2 processes; the per-rank results."""
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _result(results: list[dict[str, Any]], check: str) -> list[dict[str, Any]]:
    per_rank = [r[check] for r in results]
    for r in per_rank:
        assert r["ok"], r.get("error")
    return per_rank


def test_ddp_step_with_an_expert_unused_on_one_rank_matches_single_process(results):
    rank0, rank1 = _result(results, "ddp_unused_expert")
    # step 1: expert 3 of block "0" has no token on rank 0 but has tokens on rank 1
    assert rank0["loads"][0][UNUSED_EXPERT] == 0
    assert rank1["loads"][0][UNUSED_EXPERT] > 0
    # steps 2 and 3: no token on any rank; DDP still finds a gradient for every parameter
    assert all(r["loads"][step][UNUSED_EXPERT] == 0 for r in (rank0, rank1) for step in (1, 2))
    for r in (rank0, rank1):
        assert max(r["diffs"][:2]) < 1e-5, f"task-loss gradients differ from one process: {r['diffs']}"
        assert r["diffs"][2] < 1e-5, f"task + aux gradients differ from the per-rank-aux reference: {r['diffs']}"
        assert r["param_diff"] < 1e-5  # three SGD steps later, still the same model


@pytest.mark.parametrize("config", list(CONFIGS))
def test_ddp_gradients_match_single_process(results, config):
    for r in _result(results, "ddp_configs"):
        assert r[config] < 1e-5


def test_ddp_with_expert_dropout_needs_no_unused_parameter_search(results):
    for r in _result(results, "ddp_expert_dropout"):
        assert r["finite"]
        assert r["kept"] == [2, 2, 2]  # half the experts dropped in every pass


def test_global_routing_stats_equal_single_process_on_the_global_batch(results):
    rank0, rank1 = _result(results, "ddp_unused_expert")
    for r in (rank0, rank1):
        assert set(r["stats"]) == set(r["expected_stats"]) == {"0", "2"}
        for name, expected in r["expected_stats"].items():
            got = r["stats"][name]
            for key in ("num_experts", "tokens", "dead_experts", "active_experts", "capacity_ratio"):
                assert got[key] == expected[key], (name, key)
            for key in ("utilization", "utilization_entropy", "router_entropy", "imbalance", "dropped_rate"):
                assert got[key] == pytest.approx(expected[key], abs=1e-5), (name, key)
    # rank 0 alone never saw expert 3 of block "0": dead locally, alive globally
    assert UNUSED_EXPERT in rank0["local_stats"]["dead_experts"]
    assert UNUSED_EXPERT not in rank0["stats"]["0"]["dead_experts"]


def test_fsdp_shards_the_stacked_experts_and_matches_single_process(results):
    for r in _result(results, "fsdp"):
        assert r["type"] == "DTensor"
        assert r["local_expert_rows"] == 2  # 4 experts over 2 ranks: the stacked parameter is sharded on E
        assert r["diff"] < 1e-5


def test_bias_balancing_sums_the_loads_over_ranks(results):
    rank0, rank1 = _result(results, "bias_balancing")
    assert rank0["bias"] == rank1["bias"]  # every rank holds the same bias
    for r in (rank0, rank1):
        for got, expected in zip(r["bias"], r["reference"], strict=True):
            assert got == pytest.approx(expected, abs=1e-7)  # as one process routing the global batch
        assert r["stats_bias"] == pytest.approx(r["bias"][-2], abs=1e-6)  # the bias the last pass selected with
    # the local loads alone would have moved the ranks' biases apart
    assert rank0["local_update"] != rank1["local_update"]


def test_global_routing_stats_without_a_process_group_is_routing_stats():
    model = _model(MoEConfig(num_experts=4, top_k=2, tokens="grid:3x3", capacity_factor=1.0))
    model(_batch(0, True)[0])
    local, global_ = convmoe.routing_stats(model), global_routing_stats(model)
    for name, stats in local.blocks.items():
        assert global_[name].utilization == stats.utilization
        assert global_[name].capacity_ratio == pytest.approx(stats.capacity_ratio)
        assert global_[name].router_entropy == pytest.approx(stats.router_entropy, abs=1e-6)


def test_global_routing_stats_before_a_forward_pass_names_the_blocks():
    with pytest.raises(ValueError, match=r"blocks \['0', '2'\] have no routing yet"):
        global_routing_stats(_model(MoEConfig(num_experts=4)))


def test_the_global_switch_loss_is_the_single_process_loss_on_the_concatenated_batch(results):
    rank0, rank1 = _result(results, "global_switch")
    # DDP averages the ranks' losses and gradients: the single-process switch loss on the global batch
    assert (rank0["aux"] + rank1["aux"]) / 2 == pytest.approx(rank0["reference_aux"], abs=1e-6)
    assert rank0["grad"] == pytest.approx(rank0["reference_grad"], abs=1e-6)
    assert rank1["grad"] == rank0["grad"]
    # the per-rank (micro-batch) switch loss gives other gradients on this batch
    assert max(abs(a - b) for a, b in zip(rank0["local_switch_grad"], rank0["reference_grad"], strict=True)) > 1e-3


def test_the_window_accumulates_frequencies_over_micro_batches_and_ranks(results):
    for r in _result(results, "global_switch"):
        assert r["window_counts"] == r["expected_counts"]  # 2 micro-batches x 2 ranks = the global batch
        assert r["window_tokens"] == WORLD * LOCAL_BATCH * 7 * 7
        assert r["last_loss"] == pytest.approx(r["last_loss_expected"], rel=1e-6)
