"""The class label of every routed token: the image label, or the majority label of its pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.types import Tokens

NO_LABEL = -1


def resize_labels(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Label maps (B, H, W) resized to ``size`` with nearest-neighbour sampling, int64.

    Example:
        >>> resize_labels(torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 3]]]), (1, 2)).tolist()
        [[[0, 1]]]
    """
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.long()
    # float64 holds every class id exactly (float32 would round ids above 2**24).
    resized = F.interpolate(mask[:, None].double(), size=size, mode="nearest")
    return resized[:, 0].long()


def token_labels(target: Tensor, tokens: Tokens, ignore_index: int | None = None) -> Tensor:
    """Label of every token, (B, N) int64; ``NO_LABEL`` (-1) where a token has no labelled pixel.

    Classification (target (B,)): every token of an image carries the image label. Segmentation
    (target (B, H, W)): the label map is resized to the layer's output grid (nearest) and each token
    takes the most frequent label among its positions, ignoring ``ignore_index`` and negative ids;
    ties go to the smallest class id.

    Args:
        target: Image labels (B,) or label maps (B, H, W).
        tokens: The layer's token partition (see :func:`convmoe.analysis.layers.layer_tokens`).
        ignore_index: Label that marks unlabelled pixels (CamVid: 11).

    Raises:
        ValueError: A target that is neither (B,) nor (B, H, W).

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> tokens = create_tokens("grid:1x2").split(torch.zeros(1, 1, 2, 4))
        >>> mask = torch.tensor([[[3, 3, 5, 255], [3, 4, 255, 255]]])
        >>> token_labels(mask, tokens, ignore_index=255).tolist()
        [[3, 5]]
    """
    N = tokens.num_tokens
    if target.dim() == 1:
        labels = target.long()[:, None].expand(-1, N).clone()
        if ignore_index is not None:
            labels[labels == ignore_index] = NO_LABEL
        return labels.clamp_min(NO_LABEL)
    if target.dim() != 3:
        raise ValueError(f"targets must be image labels (B,) or label maps (B, H, W), got shape {tuple(target.shape)}.")
    B = target.shape[0]
    height, width = tokens.source.shape[-2:]
    labels = resize_labels(target, (height, width)).reshape(B, -1)
    valid = labels >= 0
    if ignore_index is not None:
        valid &= labels != ignore_index
    token_map = tokens.token_map.to(labels.device).expand(B, -1)
    if tokens.is_pixel:
        out = torch.full((B, N), NO_LABEL, dtype=torch.long, device=labels.device)
        return out.scatter_(1, token_map, torch.where(valid, labels, NO_LABEL))
    # Majority vote: count (image, token, class) triples, then argmax over classes.
    num_classes = int(labels[valid].max()) + 1 if bool(valid.any()) else 1
    batch = torch.arange(B, device=labels.device)[:, None].expand(-1, labels.shape[1])
    index = (batch * N + token_map) * num_classes + labels.clamp_min(0)
    votes = torch.bincount(index[valid], minlength=B * N * num_classes).reshape(B, N, num_classes)
    majority = votes.argmax(dim=-1)
    return torch.where(votes.sum(dim=-1) > 0, majority, NO_LABEL)
