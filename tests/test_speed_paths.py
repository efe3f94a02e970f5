"""The fast sparse paths' building blocks: grouped matmul, tiles, channels-last gathers, memory formats."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_dense_dispatch, make_block, max_abs_diff, with_dispatcher
from torch import Tensor

from convmoe import ConvGeometry, MoEConv2d
from convmoe.dispatch.assignments import routed
from convmoe.dispatch.gathered import gathered_experts
from convmoe.dispatch.grouped import (
    GatheredColumns,
    gathered_segment_matmul,
    grouped_mm_supported,
    segment_matmul,
)
from convmoe.dispatch.tiles import TileLayout, channels_last_rows, gather_rows, grid_offsets
from convmoe.experts import ConvExperts
from convmoe.tokens import create_tokens
from convmoe.types import Routing


def assert_same_gradients(out: Tensor, expected: Tensor, inputs: tuple[Tensor, ...]) -> None:
    """``out`` and ``expected`` (two graphs over ``inputs``) give the same input gradients for one random upstream."""
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("counts", [[3, 0, 5], [0, 0, 8], [8, 0, 0]])
@pytest.mark.parametrize("as_tensor", [True, False])
@pytest.mark.parametrize("width", [8, 6])  # 6 floats is not 16-byte aligned: the per-segment fallback
def test_segment_matmul_matches_per_segment_products(counts: list[int], as_tensor: bool, width: int) -> None:
    rows = torch.randn(8, width, requires_grad=True)
    weight = torch.randn(3, width, 4, requires_grad=True)
    out = segment_matmul(rows, weight, torch.tensor(counts) if as_tensor else counts)
    expected = torch.cat([segment @ weight[e] for e, segment in enumerate(rows.split(counts))])
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, (rows, weight))


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])  # 1: every chunk at its 64-row minimum
@pytest.mark.parametrize("channels_first", [False, True])
def test_gathered_segment_matmul_matches_materialised_columns(chunk_bytes: int, channels_first: bool) -> None:
    rows = torch.randn(50, 4, requires_grad=True)
    index = torch.randint(0, 50, (150, 3))
    # a transposed view, as the experts' weights are passed: the gradient must come back in that layout
    weight = torch.randn(3, 5, 12).transpose(1, 2).requires_grad_()
    counts = [70, 0, 80]  # an empty expert, and segments longer than one 64-row chunk
    columns = GatheredColumns(rows, index)
    out = gathered_segment_matmul(columns, weight, counts, channels_first=channels_first, chunk_bytes=chunk_bytes)
    materialized = columns.materialize()  # (M, T, C)
    if channels_first:
        materialized = materialized.transpose(1, 2)
    expected = segment_matmul(materialized.flatten(1), weight, counts)
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, (rows, weight))


def test_grouped_mm_support_needs_aligned_widths() -> None:
    assert grouped_mm_supported(torch.randn(4, 8), torch.randn(2, 8, 4))
    assert not grouped_mm_supported(torch.randn(4, 6), torch.randn(2, 6, 4))
    assert not grouped_mm_supported(torch.randn(4, 8), torch.randn(2, 8, 6))
    assert not grouped_mm_supported(torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 8, 4, dtype=torch.float64))


def test_tile_layout_untiles_a_non_uniform_grid() -> None:
    tokens = create_tokens("grid:2x3").split(torch.randn(1, 1, 5, 7))  # rows 2+3, columns 2+2+3
    layout = TileLayout.from_tokens(tokens)
    assert layout.tile == (3, 3)
    assert not layout.uniform
    # a canvas whose every tile holds its token id and the position inside the tile
    B, N, (th, tw) = 2, tokens.num_tokens, layout.tile
    canvas = torch.arange(B * N * th * tw, dtype=torch.float32).reshape(B * N, th, tw, 1)
    y = layout.untile(canvas, channels_last=False)
    assert y.shape == (2, 1, 5, 7)
    assert y.is_contiguous()
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    a = (rows >= 2).long()
    b = (cols >= 2).long() + (cols >= 4).long()
    token = a * 3 + b
    i = rows - torch.tensor([0, 2])[a]
    j = cols - torch.tensor([0, 2, 4])[b]
    for batch in range(B):
        expected = ((batch * N + token) * th + i) * tw + j
        assert torch.equal(y[batch, 0], expected.float())
    assert torch.equal(layout.untile(canvas, channels_last=True), y)
    assert layout.untile(canvas, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_gather_rows_reads_windows_from_the_channels_last_map() -> None:
    x = torch.randn(2, 3, 6, 5)
    rows, size = channels_last_rows(x, (8, 5))  # two zero rows below
    assert size == (8, 5)
    origin = torch.tensor([1 * 8 * 5 + 4 * 5 + 2])  # image 1, row 4, column 2
    windows = gather_rows(rows, origin, grid_offsets(3, 2, 1, 1, 5, x.device))  # 3x2 window
    expected = F.pad(x, (0, 0, 0, 2))[1, :, 4:7, 2:4].permute(1, 2, 0).reshape(6, 3)
    assert torch.equal(windows[0], expected)


def test_gathered_kernel_accepts_channels_last_receptive_fields() -> None:
    experts = ConvExperts(4, 8, num_experts=3, geometry=ConvGeometry.create(3, dilation=2), act="gelu", norm="layer")
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    x = torch.randn(1, 4, 7, 7)
    unfolded = F.unfold(x, 3, dilation=2)[0].t()  # (L, C * 9), channel-major
    channels_last = unfolded.reshape(-1, 4, 9).transpose(1, 2)  # (L, 9, C)
    counts = torch.tensor([4, 0, unfolded.shape[0] - 4])
    torch.testing.assert_close(gathered_experts(experts, channels_last, counts),
                               gathered_experts(experts, unfolded, counts.tolist()), atol=1e-5, rtol=0)


BANKS = {"conv": {}, "lowrank": {"experts": "lowrank", "expert_kwargs": {"rank": 3}}}


@pytest.mark.parametrize("tokens", ["pixel", "grid:3x3", "grid:2x4", "patch:4", "patch:2", "image"])
@pytest.mark.parametrize("spec", ["sparse:gathered", "sparse:regions", "sparse"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("out_channels", [8, 64])  # 64: fewer rows than E x C_out, the columns are transposed
@pytest.mark.parametrize("bank", list(BANKS))
def test_sparse_paths_keep_the_input_memory_format_and_match_dense(tokens: str, spec: str, out_channels: int,
                                                                   memory_format: torch.memory_format,
                                                                   bank: str) -> None:
    block = make_block(tokens=tokens, dispatcher=spec, stride=2, out_channels=out_channels, **BANKS[bank]).eval()
    block = block.to(memory_format=memory_format)
    x = torch.randn(2, 4, 11, 10).contiguous(memory_format=memory_format).requires_grad_()
    y = block(x)
    assert y.is_contiguous(memory_format=memory_format)
    assert_matches_dense_dispatch(block, x, y, tolerance=1e-4)


def test_auto_prefers_gathered_for_small_tokens_and_regions_for_large_ones(x_small: Tensor) -> None:
    def chosen(tokens: str, **kwargs) -> str:
        block = make_block(tokens=tokens, **kwargs)
        return block.dispatcher.choose_path(block.tokens.split(x_small), block.experts)

    assert chosen("pixel") == "gathered"
    assert chosen("pixel", groups=2) == "gathered"  # per-pixel tokens: gathered, grouped or not
    assert chosen("patch:2") == "gathered"
    assert chosen("patch:2", groups=2) == "regions"  # grouped experts: a conv per expert
    assert chosen("patch:8") == "regions"
    assert chosen("image") == "merged"
    block = make_block(tokens="patch:8", dispatcher="sparse")
    block.dispatcher.gathered_max_positions = 64
    assert block.dispatcher.choose_path(block.tokens.split(x_small), block.experts) == "gathered"


def test_expert_counts_stay_a_tensor() -> None:
    block = make_block(tokens="grid:3x3", capacity_factor=0.5).eval()
    block(torch.randn(2, 4, 9, 9))
    part, counts = routed(block.last_routing).by_expert(4)
    assert isinstance(counts, Tensor)
    assert counts.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(part.expert, minlength=4))
    assert (part.expert.diff() >= 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", ["pixel", "grid:3x3", "patch:8", "image"])
def test_cuda_bfloat16_autocast_channels_last_matches_dense(tokens: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, device="cuda")
    block = MoEConv2d.from_conv(conv, num_experts=8, top_k=2, tokens=tokens, upcycle=False).cuda().eval()
    x = torch.randn(4, 64, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block(x)
        reference = with_dispatcher(block, "dense")(x)
    assert y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert max_abs_diff(y.float(), reference.float()) <= 5e-2 * float(reference.float().abs().max())


@pytest.mark.parametrize("tokens", ["pixel", "patch:2", "grid:3x3"])
@pytest.mark.parametrize("post", [{}, {"expert_act": "relu"}])
def test_depthwise_experts_on_the_gathered_path_match_dense(tokens: str, post: dict) -> None:
    block = make_block(8, 8, 5, padding=2, groups=8, tokens=tokens, dispatcher="sparse:gathered", **post).eval()
    x = torch.randn(2, 8, 9, 9).requires_grad_()
    y = block(x)
    dense = with_dispatcher(block, "dense")
    reference = dense(x)
    assert max_abs_diff(y, reference) <= 1e-4
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, block.experts.weight], grad)
    want = torch.autograd.grad(reference, [x, dense.experts.weight], grad)
    for g, w in zip(got, want, strict=True):
        assert max_abs_diff(g, w) <= 1e-4


@pytest.mark.parametrize("dispatcher", ["sparse", "sparse:gathered", "sparse:regions", "sparse:merged", "dense"])
@pytest.mark.parametrize("tokens", ["pixel", "grid:3x3", "image"])
def test_channels_last_model_computes_the_same_forward_and_backward(tokens: str, dispatcher: str) -> None:
    """``.to(memory_format=torch.channels_last)`` reaches the 5-D expert weight (each expert becomes a
    channels-last conv weight), and every path computes what the contiguous block does."""
    if dispatcher == "sparse:merged" and tokens != "image":
        pytest.skip("the merged path routes whole images")
    block = make_block(8, 6, tokens=tokens, dispatcher=dispatcher, top_k=2, noise_std=0.0).train()
    x = torch.randn(2, 8, 9, 9)
    converted = copy.deepcopy(block).to(memory_format=torch.channels_last)
    weight = converted.experts.weight
    assert weight.shape == block.experts.weight.shape
    assert all(weight[e].is_contiguous(memory_format=torch.channels_last) for e in range(weight.shape[0]))
    x_cl = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    y, y_cl = block(x), converted(x_cl)
    assert max_abs_diff(y, y_cl) <= 1e-5
    grad = torch.randn_like(y)
    y.backward(grad)
    y_cl.backward(grad)
    assert max_abs_diff(x.grad, x_cl.grad) <= 1e-5
    assert max_abs_diff(block.experts.weight.grad, converted.experts.weight.grad) <= 1e-5
    assert converted.to(memory_format=torch.contiguous_format).experts.weight.is_contiguous()
    converted.to(memory_format=torch.channels_last_3d)  # 5-D tensors take it as they are


def test_image_tokens_merge_small_batches_and_split_large_ones_into_sub_batches() -> None:
    """Merging builds B x C_out x C_in x kh x kw weights; above merged_max_weights sub-batches are faster."""
    block = MoEConv2d(256, 256, 3, padding=1, num_experts=8, top_k=2, tokens="image")
    for batch, path in ((8, "merged"), (32, "regions")):  # 4.7M and 18.9M merged weights
        split = block.tokens.split(torch.randn(batch, 256, 14, 14))
        assert block.dispatcher.choose_path(split, block.experts) == path
    block.dispatcher.merged_max_weights = 10 ** 9
    assert block.dispatcher.choose_path(block.tokens.split(torch.randn(32, 256, 14, 14)), block.experts) == "merged"


@pytest.mark.parametrize(("c_in", "c_out", "kernel", "batch", "size", "path"), [
    (112, 672, 1, 64, 6, "gathered"),  # Lite0's blocks.5.0.conv_pw at 96 px in training: 4.8M merged weights
    (112, 672, 1, 32, 6, "merged"),  # 2.4M: within 8M * (36 / 64)^2
    (192, 192, 3, 8, 3, "gathered"),  # 3x3 maps: merging a batch lost at every batch size
    (192, 192, 3, 1, 3, "merged"),  # one image, top-1: that expert's own conv
    (256, 256, 3, 8, 7, "gathered"),  # 4.72M > 8M * (49 / 64)^2 = 4.69M
    (256, 256, 3, 1, 7, "merged"),
    (112, 672, 1, 64, 8, "merged"),  # 64 positions: the full budget
    (32, 64, 3, 8, 3, "merged"),  # low-rank experts keep their rank on small maps instead
])
def test_image_tokens_merge_less_on_small_maps(c_in: int, c_out: int, kernel: int, batch: int, size: int,
                                               path: str) -> None:
    """On maps of fewer than 64 positions the merged-weights budget shrinks by (positions / 64)^2: there
    merging large batches was 1.2-20x slower than gathering (benchmarks/bench_image_paths.py), training or not."""
    experts = {"experts": "lowrank", "expert_kwargs": {"rank": 4}} if c_in == 32 else {}
    block = MoEConv2d(c_in, c_out, kernel, padding=kernel // 2, num_experts=8, top_k=1, tokens="image", **experts)
    x = torch.randn(batch, c_in, size, size, requires_grad=True)
    with torch.no_grad():
        block.router.gate.proj.weight.normal_()  # images spread over the experts
    assert block.dispatcher.choose_path(block.tokens.split(x), block.experts, slots=1) == path
    assert_matches_dense_dispatch(block.train(), x, block(x), tolerance=1e-4)


@pytest.mark.parametrize(("top_k", "size", "groups", "path"), [
    (1, 3, 1, "merged"), (2, 3, 1, "gathered"), (2, 8, 1, "merged"), (1, 3, 192, "merged")])  # 192: depthwise
def test_one_image_with_one_expert_runs_that_experts_conv(top_k: int, size: int, groups: int, path: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 1, top-1: the expert's own conv, its output scaled, no weight copied or mixed; with two experts
    on a small map the mixing costs more than gathering. Each equals the dense reference, gradients included."""
    torch.manual_seed(0)
    block = MoEConv2d(192, 192, 3, padding=1, groups=groups, num_experts=4, top_k=top_k, tokens="image")
    with torch.no_grad():
        block.router.gate.proj.weight.normal_()
    x = torch.randn(1, 192, size, size, requires_grad=True)
    assert block.dispatcher.choose_path(block.tokens.split(x), block.experts, slots=top_k) == path
    calls: list[tuple[int, ...]] = []
    mixes: list[str] = []
    conv2d, einsum = F.conv2d, torch.einsum
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a, **k: calls.append(tuple(w.shape)) or conv2d(x, w, *a, **k))
    monkeypatch.setattr(torch, "einsum", lambda eq, *a: mixes.append(eq) or einsum(eq, *a))
    scattered: list[int] = []
    dense_weights = Routing.dense_weights
    monkeypatch.setattr(Routing, "dense_weights", lambda r: scattered.append(1) or dense_weights(r))
    y = block(x)
    monkeypatch.undo()
    if path == "merged":
        assert calls == [(192, 192 // groups, 3, 3)]
        assert (mixes == []) == (top_k == 1)  # top-1: the expert's own weight, nothing mixed
        assert (scattered == []) == (top_k == 1)  # nor the (B, E) weights built: the routing names the expert
    assert_matches_dense_dispatch(block, x, y, tolerance=1e-4)


def test_the_small_map_rules_apply_on_cpu_only() -> None:
    """They were measured on CPU; other devices keep the full merged budget and the small-patch gathering rule."""
    block = MoEConv2d(112, 672, 1, num_experts=8, top_k=1, tokens="image")
    for device, path in (("cpu", "gathered"), ("meta", "merged")):
        split = block.tokens.split(torch.randn(64, 112, 6, 6, device=device))
        assert block.dispatcher.choose_path(split, block.experts) == path
    for device, path in (("cpu", "gathered"), ("meta", "regions")):
        split = block.tokens.split(torch.randn(256, 112, 6, 6, device=device))  # 19M merged weights: over budget
        assert block.dispatcher.choose_path(split, block.experts) == path


def test_pointwise_experts_gather_image_tokens_of_small_maps() -> None:
    """A 1x1 conv reads no halo, so gathering copies each position once. Measured (bench_image_paths.py --kernel 1
    --train): 192 -> 1152 on a 3x3 map at batch 32, 2.83x the dense conv gathered against 4.33x in sub-batches."""
    block = MoEConv2d(192, 1152, 1, num_experts=8, top_k=1, tokens="image")
    for size, path in ((3, "gathered"), (8, "gathered"), (9, "regions")):  # 64 positions at most
        x = torch.randn(64, 192, size, size)
        assert block.dispatcher.choose_path(block.tokens.split(x), block.experts) == path
    grouped = MoEConv2d(256, 256, 1, groups=2, num_experts=8, top_k=1, tokens="image")
    x = torch.randn(64, 256, 3, 3)
    assert grouped.dispatcher.choose_path(grouped.tokens.split(x), grouped.experts) == "regions"  # a conv per expert


@pytest.mark.parametrize("batch", [1, 3])
def test_merged_path_keeps_a_channels_last_batch_of_one_channels_last(batch: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """At batch 1 the merged conv runs on the input itself: reshaping it to (1, C, H, W) changed the batch stride,
    CPU convs then read it as NCHW and copied it (a 1x1 conv, 320 -> 1280 on 3x3, took 634 us against 145 us)."""
    torch.manual_seed(0)
    block = with_dispatcher(MoEConv2d(32, 64, 1, num_experts=4, top_k=2, tokens="image"), "sparse:merged")
    with torch.no_grad():
        block.router.gate.proj.weight.normal_()
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 32, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    outputs: list[Tensor] = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: outputs.append(conv2d(*a, **k)) or outputs[-1])
    y = block(x)
    monkeypatch.undo()
    assert len(outputs) == 1
    assert outputs[0].is_contiguous(memory_format=torch.channels_last) == (batch == 1)  # a grouped conv: NCHW
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches_dense_dispatch(block, x, y, tolerance=1e-5)


@pytest.mark.parametrize(("kernel", "batch", "channels_last", "path"), [
    (1, 1, True, "merged"), (3, 1, True, "merged"), (1, 1, False, "gathered"), (3, 1, False, "gathered"),
    (1, 8, True, "gathered"), (1, 1, "strided", "merged")])
def test_one_channels_last_image_merges_on_small_maps(kernel: int, batch: int, channels_last: bool | str,
                                                      path: str) -> None:
    """Batch 1, top-2, 3x3 maps: merging beat gathering channels-last (a 1x1 conv 320 -> 1280: 3.06x the dense conv
    against 3.88x, one thread) and lost in NCHW (2.36x against 1.92x), where the conv itself is the slower
    layout's (benchmarks/results/image_paths_b1_top2_*). A strided conv reads a strided view of the map."""
    stride = 2 if channels_last == "strided" else 1
    block = MoEConv2d(320, 1280, kernel, stride=stride, padding=kernel // 2, num_experts=8, top_k=2, tokens="image")
    with torch.no_grad():
        block.router.gate.proj.weight.normal_()
    x = torch.randn(batch, 320, 3 * stride, 3 * stride, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    source = block.geometry.centre_sample_unpadded(x, (3, 3))
    assert block.dispatcher.choose_path(block.tokens.split(source), block.experts, slots=2) == path
    assert_matches_dense_dispatch(block, x, block(x), tolerance=1e-4)
