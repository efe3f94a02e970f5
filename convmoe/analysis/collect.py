"""Collecting routing over a dataset: per layer, class x expert counts, expert load, drops and positions.

Only sums are kept (a (classes, experts) matrix and a few counters per layer), so a whole dataset
fits in a few kilobytes whatever its size::

    collection = collect_routing(model, val_loader)
    collection.layers["layer4.0.conv2"].class_shares()     # (C, E), rows sum to 1
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from convmoe.analysis.labels import NO_LABEL, token_labels
from convmoe.analysis.layers import OutputSizeRecorder, layer_tokens, moe_layers
from convmoe.engine.evaluate import split_batch
from convmoe.progress import progress_bar
from convmoe.types import Routing, Tokens


def routing_assignment(routing: Routing, dtype: torch.dtype = torch.float32) -> Tensor:
    """Share of every token that goes to each expert, (B, N, E) in ``dtype``.

    The dispatched combine weights normalised per token, so a routed token's row sums to 1 (top-k
    splits it by weight) and a dropped token's row is 0.

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 2, 3), torch.full((1, 2, 3), 1 / 3),
        ...                        torch.tensor([[[0, 2], [1, 2]]]), torch.tensor([[[0.75, 0.25], [0.5, 0.5]]]))
        >>> routing_assignment(r).tolist()
        [[[0.75, 0.0, 0.25], [0.0, 0.5, 0.5]]]
    """
    weights = routing.dense_weights().to(dtype)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(weights))


def _accumulator_device(device: torch.device) -> torch.device:
    # float64 sums stay exact far beyond float32's 2**24; MPS has no float64, so sum on the CPU there.
    return torch.device("cpu") if device.type == "mps" else device


@dataclass
class LayerRouting:
    """Routing sums of one MoE layer over every batch seen.

    Attributes:
        name: The layer's qualified name.
        num_experts: E.
        top_k: The block's ``top_k``.
        tokens_spec: Its tokenizer, e.g. ``"grid:3x3"``.
        class_expert: Combine-weighted count of class-c tokens routed to expert e, (C, E) float64;
            dropped tokens and tokens without a label are not counted.
        load: Dispatched slots per expert, (E,) float64.
        usage: Sum over routed tokens of each expert's share of the token (:func:`routing_assignment`),
            (E,) float64: the combine-weight usage ``convmoe.unpatch(how="usage")`` folds with.
        tokens: Tokens routed.
        dropped: Tokens that reached no expert.
        router_entropy_sum: Sum over tokens of the normalised router entropy.
        images: Images seen.
        sized_images: Images seen with a known output size (see :class:`RoutingCollector`).
        positions: Output positions of those images (sum of H_out * W_out).
        dispatched_positions: Output positions computed by an expert, summed over slots (a position
            of a token sent to 2 experts counts twice): the work of the experts.
        output_size: The last output size seen, (H_out, W_out).

    Example:
        >>> layer = LayerRouting("conv", num_experts=2, top_k=1, tokens_spec="pixel")
        >>> layer.class_shares().shape
        torch.Size([0, 2])
    """

    name: str
    num_experts: int
    top_k: int
    tokens_spec: str
    class_expert: Tensor = field(default=None)  # type: ignore[assignment]
    load: Tensor = field(default=None)  # type: ignore[assignment]
    usage: Tensor = field(default=None)  # type: ignore[assignment]
    tokens: float = 0.0
    dropped: float = 0.0
    router_entropy_sum: float = 0.0
    images: int = 0
    sized_images: int = 0
    positions: float = 0.0
    dispatched_positions: float = 0.0
    output_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.class_expert is None:
            self.class_expert = torch.zeros(0, self.num_experts, dtype=torch.float64)
        if self.load is None:
            self.load = torch.zeros(self.num_experts, dtype=torch.float64)
        if self.usage is None:
            self.usage = torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def num_classes(self) -> int:
        """Rows of ``class_expert`` (highest label seen + 1, or the given number of classes)."""
        return self.class_expert.shape[0]

    def class_tokens(self) -> Tensor:
        """Routed, labelled tokens of each class, (C,) float64."""
        return self.class_expert.sum(dim=1).cpu()

    def class_shares(self) -> Tensor:
        """Share of each class's tokens routed to each expert, (C, E) float64; rows sum to 1 (0 for unseen classes).

        Example:
            >>> layer = LayerRouting("conv", num_experts=2, top_k=1, tokens_spec="pixel",
            ...                      class_expert=torch.tensor([[3.0, 1.0]], dtype=torch.float64))
            >>> layer.class_shares().tolist()
            [[0.75, 0.25]]
        """
        counts = self.class_expert.cpu()
        totals = counts.sum(dim=1, keepdim=True)
        return torch.where(totals > 0, counts / totals.clamp_min(1e-300), torch.zeros_like(counts))

    def mean_router_entropy(self) -> float:
        """Mean normalised router entropy over the routed tokens (NaN before any token)."""
        return self.router_entropy_sum / self.tokens if self.tokens else float("nan")

    def reset(self) -> None:
        """Zero every sum (the number of classes is kept)."""
        self.class_expert = torch.zeros_like(self.class_expert)
        self.load = torch.zeros_like(self.load)
        self.usage = torch.zeros_like(self.usage)
        self.tokens = self.dropped = self.router_entropy_sum = self.positions = self.dispatched_positions = 0.0
        self.images = self.sized_images = 0

    def _grow(self, num_classes: int, device: torch.device) -> None:
        device = _accumulator_device(device)
        if self.class_expert.device != device:
            self.class_expert, self.load, self.usage = (t.to(device) for t in (self.class_expert, self.load, self.usage))
        if num_classes > self.num_classes:
            extra = self.class_expert.new_zeros(num_classes - self.num_classes, self.num_experts)
            self.class_expert = torch.cat([self.class_expert, extra])

    @torch.no_grad()
    def add(self, routing: Routing, labels: Tensor | None, tokens: Tokens | None = None) -> None:
        """Add one batch's routing.

        Args:
            routing: The block's routing of the batch, (B, N, ...).
            labels: Token labels (B, N), ``NO_LABEL`` for none; None to count balance only.
            tokens: The token partition (for the positions and the experts' work), or None.
        """
        B, N, E = routing.probs.shape
        device = _accumulator_device(routing.probs.device)
        self._grow(self.num_classes, device)
        self.load += routing.expert_load().to(self.load)
        # float64 so that each token's shares sum to 1 to ~1e-16 and class totals stay whole numbers.
        assignment = routing_assignment(routing, torch.float64 if device.type != "mps" else torch.float32)
        assignment = assignment.reshape(-1, E).to(device)
        self.usage += assignment.sum(dim=0).to(self.usage)
        self.tokens += B * N
        self.images += B
        self.dropped += float(routing.dropped.sum())
        probs = routing.probs.float()
        if E > 1:
            token_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1) / math.log(E)
            self.router_entropy_sum += float(token_entropy.sum())
        if tokens is not None:
            sizes = tokens.counts().to(routing.slot_mask.device)
            height, width = tokens.source.shape[-2:]
            self.sized_images += B
            self.positions += B * height * width
            self.dispatched_positions += float((routing.slot_mask.sum(dim=-1).to(sizes.dtype) * sizes).sum())
            self.output_size = (int(height), int(width))
        if labels is None:
            return
        labels = labels.to(device).reshape(-1)
        keep = (labels != NO_LABEL) & (assignment.sum(dim=-1) > 0)
        if not bool(keep.any()):
            return
        self._grow(int(labels[keep].max()) + 1, device)
        target = self.class_expert
        target.index_add_(0, labels[keep].to(target.device), assignment[keep].to(target))


class RoutingCollector:
    """Sums every MoE layer's routing over batches, with the tokens' class labels.

    Call :meth:`update` right after each forward pass, with that batch's targets: image labels (B,)
    or label maps (B, H, W). Forward hooks record each layer's output size (needed to place label
    maps on the token grid), so :meth:`attach` the model first; :func:`collect_routing` does all of it.

    Args:
        ignore_index: Label of unlabelled pixels (CamVid: 11), skipped.
        num_classes: Rows of the class x expert matrices from the start (needed to sum them across
            processes); otherwise they grow with the highest label seen.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2, tokens="grid:2x2"))
        >>> collector = RoutingCollector().attach(model)
        >>> _ = model(torch.randn(2, 3, 8, 8))
        >>> collector.update(model, torch.tensor([0, 1]))
        >>> collector.layers["0"].class_shares().sum(dim=1).tolist()
        [1.0, 1.0]
    """

    def __init__(self, ignore_index: int | None = None, num_classes: int | None = None) -> None:
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self.layers: dict[str, LayerRouting] = {}
        self.recorder = OutputSizeRecorder()
        self._tokens: dict[tuple[str, tuple[int, int]], Tokens] = {}

    def attach(self, model: nn.Module) -> RoutingCollector:
        """Record the MoE layers' output sizes from now on (forward hooks); returns ``self``."""
        self.recorder.attach(model)
        return self

    def detach(self) -> None:
        """Remove the forward hooks."""
        self.recorder.detach()

    def reset(self) -> None:
        """Zero every layer's sums."""
        for layer in self.layers.values():
            layer.reset()

    def _layer(self, name: str, block: nn.Module) -> LayerRouting:
        if name not in self.layers:
            config = block.config
            layer = LayerRouting(name, config.num_experts, config.top_k, str(block.tokens))
            if self.num_classes is not None:
                layer._grow(self.num_classes, torch.device("cpu"))
            self.layers[name] = layer
        return self.layers[name]

    def _layer_tokens(self, name: str, block: nn.Module) -> Tokens | None:
        size = self.recorder.sizes.get(name)
        if size is None:
            return None
        key = (name, size)
        if key not in self._tokens:
            self._tokens[key] = layer_tokens(block, size)
        return self._tokens[key]

    @torch.no_grad()
    def update(self, model: nn.Module, target: Tensor | None = None) -> None:
        """Add the routing of the model's last forward pass, labelled by ``target``.

        Args:
            model: The model that just ran (wrapped in DDP or compiled is fine).
            target: Image labels (B,) or label maps (B, H, W); None counts balance only.

        Raises:
            ValueError: Label maps but no recorded output size (call :meth:`attach` before the forward
                pass), or a routing whose batch does not match ``target``.
        """
        for name, block in moe_layers(model):
            routing = block.last_routing
            if routing is None:
                continue
            B, N = routing.probs.shape[:2]
            tokens = self._layer_tokens(name, block)
            if tokens is not None and tokens.num_tokens != N:
                tokens = None  # the hooks saw another pass than this routing; keep balance, skip positions
            labels = None
            if target is not None:
                if target.shape[0] != B:
                    raise ValueError(f"MoE layer {name!r} routed a batch of {B} but the targets have {target.shape[0]}; "
                                     "call update() right after the forward pass of those targets.")
                if target.dim() == 1:
                    labels = target.long()[:, None].expand(B, N)
                    if self.ignore_index is not None:
                        labels = labels.masked_fill(labels == self.ignore_index, NO_LABEL)
                elif tokens is None:
                    raise ValueError(f"no output size recorded for MoE layer {name!r}: call attach(model) before the "
                                     "forward pass so that label maps can be placed on its token grid.")
                else:
                    labels = token_labels(target, tokens, self.ignore_index)
            self._layer(name, block).add(routing, labels, tokens)


@dataclass
class RoutingCollection:
    """Routing of every MoE layer summed over a dataset.

    Attributes:
        layers: Layer name -> :class:`LayerRouting`, in module order.
        task: ``"classification"`` (image labels) or ``"segmentation"`` (label maps).
        images: Images seen.
        class_names: Names of the classes, or None (ids are used).

    Example:
        >>> RoutingCollection({}, "classification", 0).class_name(3)
        '3'
    """

    layers: dict[str, LayerRouting]
    task: str
    images: int
    class_names: list[str] | None = None

    def class_name(self, index: int) -> str:
        """The name of class ``index`` (its id when there are no names)."""
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return str(self.class_names[index])
        return str(index)


def collect_routing(model: nn.Module, loader: Iterable, *, device: str | torch.device | None = None,
                    ignore_index: int | None = None, num_classes: int | None = None,
                    class_names: list[str] | None = None, max_batches: int | None = None,
                    progress: bool = False) -> RoutingCollection:
    """Run ``model`` (eval mode, no gradients) over ``loader`` and sum every MoE layer's routing.

    Args:
        model: A model with MoE blocks.
        loader: Batches of dicts ``{"image", "label" | "mask"}`` or ``(image, target)`` pairs.
        device: Device the inputs are moved to (default: the model's device); the model must be there.
        ignore_index: Label of unlabelled pixels, skipped.
        num_classes: Fixes the number of class rows (default: highest label seen + 1).
        class_names: Class names for reports.
        max_batches: Stop after this many batches.
        progress: Show a progress bar.

    Returns:
        A :class:`RoutingCollection`. The model's training mode is restored afterwards.

    Raises:
        ValueError: The model has no MoE block, or the loader gave no batch.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2))
        >>> batches = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
        >>> collection = collect_routing(model, batches)
        >>> collection.task, collection.images, list(collection.layers)
        ('classification', 2, ['0'])
    """
    if not any(True for _ in moe_layers(model)):
        raise ValueError("the model has no MoE block to analyse; patch it first (convmoe.patch) or load an MoE model.")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    was_training = model.training
    model.eval()
    collector = RoutingCollector(ignore_index=ignore_index, num_classes=num_classes).attach(model)
    task, images = None, 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(progress_bar(loader, description="routing", enabled=progress)):
                if max_batches is not None and i >= max_batches:
                    break
                inputs, target = split_batch(batch)
                inputs, target = inputs.to(device), torch.as_tensor(target).to(device)
                model(inputs)
                collector.update(model, target)
                task = task or ("classification" if target.dim() == 1 else "segmentation")
                images += inputs.shape[0]
    finally:
        collector.detach()
        model.train(was_training)
    if task is None:
        raise ValueError("the loader gave no batch; check the dataset (and max_batches).")
    return RoutingCollection(collector.layers, task, images, list(class_names) if class_names is not None else None)
