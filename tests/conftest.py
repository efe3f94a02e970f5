"""Shared fixtures and helpers for the convmoe test suite.

Import helpers with ``from conftest import make_block`` (pytest puts ``tests/`` on the path).
Shapes stay tiny (B=2, C=4..8, odd H=W=9) so the whole core suite runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import copy
import hashlib
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from convmoe import (
    DISPATCHERS,
    DROPOUTS,
    EXPERTS,
    GATES,
    LOSSES,
    ROUTERS,
    TOKENS,
    MoEConv2d,
    create_dispatcher,
)

TOKEN_SPECS = ["pixel", "grid:3x3", "grid:2x4", "patch:4", "image"]
def default_top_k(router: str) -> int:
    """top_k used for ``router`` in the tests: 2, except the top-1 positional router.

    Example:
        >>> default_top_k("positional")
        1
    """
    return 1 if router == "positional" else 2


@torch.no_grad()
def randomize_experts(block: MoEConv2d, scale: float = 0.3) -> MoEConv2d:
    """Re-initialise every expert parameter (and the shared expert's) with independent random values.

    Norm weights are drawn around 1, everything else around 0, so each expert computes a different,
    well-scaled function: sparse/dense equivalence tests then cannot pass by symmetry.

    Example:
        >>> block = randomize_experts(MoEConv2d(4, 4, 3, padding=1, num_experts=2))
        >>> bool((block.experts.weight[0] != block.experts.weight[1]).any())
        True
    """
    banks = [block.experts] + ([block.shared_expert] if block.shared_expert is not None else [])
    for bank in banks:
        for name, parameter in bank.named_parameters():
            noise = torch.randn_like(parameter) * scale
            parameter.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return block


def make_block(in_channels: int = 4, out_channels: int = 6, kernel_size: int | tuple[int, int] = 3, *,
               padding: Any = 1, distinct_experts: bool = True, seed: int = 0, **kwargs: Any) -> MoEConv2d:
    """A small MoEConv2d; conv arguments and MoEConfig fields are keywords.

    Args:
        in_channels, out_channels, kernel_size, padding: As in ``nn.Conv2d``.
        distinct_experts: Re-initialise every expert randomly (see :func:`randomize_experts`).
        seed: Seed for the block's initialisation, so two calls give the same block.
        **kwargs: ``stride``/``dilation``/``groups``/``bias``/``padding_mode`` or MoEConfig fields;
            ``num_experts`` defaults to 4.

    Example:
        >>> make_block(tokens="grid:3x3")(torch.randn(2, 4, 9, 9)).shape
        torch.Size([2, 6, 9, 9])
    """
    kwargs.setdefault("num_experts", 4)
    torch.manual_seed(seed)
    block = MoEConv2d(in_channels, out_channels, kernel_size, padding=padding, **kwargs)
    if distinct_experts:
        randomize_experts(block)
    return block


def with_dispatcher(block: MoEConv2d, dispatcher: str) -> MoEConv2d:
    """A deep copy of ``block`` (same parameters and mode) that dispatches with ``dispatcher``.

    Example:
        >>> with_dispatcher(make_block(), "dense").dispatcher
        DenseDispatcher()
    """
    other = copy.deepcopy(block)
    other.dispatcher = create_dispatcher(dispatcher)
    return other


def assert_matches_dense_dispatch(block: MoEConv2d, x: Tensor, y: Tensor, tolerance: float = 1e-5) -> dict[str, Tensor]:
    """``y = block(x)`` (``x`` requiring grad) equals the dense dispatcher's output, input gradient and
    parameter gradients; each parameter's tolerance is ``tolerance`` times max(1, its gradient's size).

    Returns:
        ``block``'s parameter gradients, by name.

    Example:
        >>> block = make_block().eval()
        >>> x = torch.randn(1, 4, 5, 5, requires_grad=True)
        >>> sorted(assert_matches_dense_dispatch(block, x, block(x)))[:2]
        ['experts.bias', 'experts.weight']
    """
    dense = with_dispatcher(block, "dense")
    x_dense = x.detach().clone().requires_grad_()
    expected = dense(x_dense)
    assert max_abs_diff(y, expected) <= tolerance
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    (expected * grad).sum().backward()
    assert max_abs_diff(x.grad, x_dense.grad) <= tolerance
    got, want = gradients(block), gradients(dense)
    for name, value in got.items():
        assert max_abs_diff(value, want[name]) <= tolerance * max(1.0, float(value.abs().max())), name
    return got


def run_seeded(block: nn.Module, x: Tensor, seed: int = 1) -> Tensor:
    """``block(x)`` after seeding the RNG, so router noise and expert dropout repeat exactly.

    Example:
        >>> block = make_block(noise_std=1.0).train()
        >>> x = torch.randn(2, 4, 9, 9)
        >>> torch.equal(run_seeded(block, x), run_seeded(block, x))
        True
    """
    torch.manual_seed(seed)
    return block(x)


def gradients(module: nn.Module) -> dict[str, Tensor]:
    """Gradient of every parameter of ``module`` (zeros where none reached it), by name.

    Example:
        >>> sorted(gradients(nn.Linear(2, 2)))
        ['bias', 'weight']
    """
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
            for name, p in module.named_parameters()}


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| as a python float, shapes checked.

    Example:
        >>> max_abs_diff(torch.ones(2), torch.zeros(2))
        1.0
    """
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def x_small() -> Tensor:
    """A (2, 4, 9, 9) float32 input."""
    return torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1234))


@pytest.fixture
def isolated_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register parts without leaking them into the global registries (monkeypatch restores them)."""
    for registry in (TOKENS, ROUTERS, GATES, DISPATCHERS, EXPERTS, DROPOUTS, LOSSES):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a network connection fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data``: the etag the Hub gives a file stored without LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# Files the Hub keeps in LFS (their etag, and cache blob name, is the sha256).
LFS_SUFFIXES = (".safetensors", ".png")


def make_hub_cache(cache: Path, repo_id: str, folder: Path, files: tuple[str, ...] | None = None) -> str:
    """Lay ``folder``'s files (all, or ``files``) out as huggingface_hub's cache holds repo ``repo_id`` at
    one commit; returns the commit hash.

    Blobs are named by their etag: the sha256 for LFS files, the git blob sha1 otherwise; snapshot
    files are relative symlinks to them; ``refs/main`` holds the commit hash.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode() + (folder / "config.json").read_bytes()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    names = files if files is not None else sorted(p.name for p in folder.iterdir() if p.is_file())
    for name in names:
        data = (folder / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_sha1(data)
        (repo / "blobs" / blob).write_bytes(data)
        (repo / "snapshots" / commit / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs" / "main").write_text(commit)
    return commit
