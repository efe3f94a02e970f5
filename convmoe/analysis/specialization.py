"""Specialisation of a layer: how much the expert choice tells about the class, and back.

The class x expert matrix ``joint[c, e]`` holds the (combine-weighted) number of class-c tokens
routed to expert e. Normalised, it is the joint distribution P(C, E) of a token's class and its
expert, and the mutual information I(C; E) measures the dependence between the two.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch  # noqa: F401  (the examples use it)
from torch import Tensor


def entropy(distribution: Tensor) -> float:
    """Shannon entropy in nats of a distribution given as non-negative weights (normalised here).

    Example:
        >>> round(entropy(torch.tensor([1.0, 1.0, 0.0])), 4) == round(math.log(2), 4)
        True
    """
    p = distribution.double().flatten()
    total = float(p.sum())
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * p.log()).sum()) + 0.0  # + 0.0 turns -0.0 (a one-hot distribution) into 0.0


def mutual_information(joint: Tensor) -> float:
    """I(C; E) = H(C) + H(E) - H(C, E) in nats, from a (C, E) matrix of counts or probabilities.

    Example:
        >>> round(mutual_information(torch.eye(2)) / math.log(2), 6)      # one expert per class: 1 bit
        1.0
        >>> mutual_information(torch.ones(2, 3))                         # independent: 0
        0.0
    """
    if joint.dim() != 2:
        raise ValueError(f"joint must be a (classes, experts) matrix, got shape {tuple(joint.shape)}.")
    joint = joint.double()
    value = entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint)
    return value if value > 1e-12 else 0.0  # rounding leaves +-1e-16 for independent variables


@dataclass(frozen=True)
class SpecializationScore:
    """How class-specific a layer's routing is.

    Attributes:
        score: Normalised mutual information ``2 I(C; E) / (H(C) + H(E))`` in [0, 1]: 1 when class and
            expert determine each other (class c always goes to expert c); 0 when the expert choice is
            independent of the class, and also when all tokens go to one expert (a collapsed layer).
        mutual_information_bits: I(C; E) in bits.
        class_entropy_bits: H(C) in bits.
        expert_entropy_bits: H(E) in bits.
        tokens: Labelled tokens the matrix was built from (sum of the matrix).

    Example:
        >>> specialization_score(torch.eye(3) * 10).score
        1.0
    """

    score: float
    mutual_information_bits: float
    class_entropy_bits: float
    expert_entropy_bits: float
    tokens: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict."""
        return asdict(self)


def specialization_score(joint: Tensor) -> SpecializationScore:
    """Normalised mutual information between class and expert choice, from a (C, E) matrix.

    ``NMI = 2 I(C; E) / (H(C) + H(E))``, the arithmetic normalisation (Vinh et al., 2010, JMLR 11;
    scikit-learn's default). It is 0 for a collapsed layer, whose near-zero H(E) would make a
    ``min``-normalised score blow up on a few stray tokens. It reaches 1 only when the numbers of
    used classes and experts match: 10 balanced classes mapped without error onto 4 balanced experts
    give 2 log 4 / (log 10 + log 4) = 0.75, so compare layers of one model (same classes, same E).

    The plug-in estimate is biased upwards by about ``(C - 1)(E - 1) / (2 n)`` nats for ``n``
    independent samples, and tokens of one image are not independent: use many images per class.

    Args:
        joint: Counts (or probabilities) of class c routed to expert e, (C, E).

    Returns:
        A :class:`SpecializationScore`.

    Example:
        >>> specialization_score(torch.tensor([[5.0, 5.0], [5.0, 5.0]])).score
        0.0
    """
    to_bits = 1.0 / math.log(2)
    h_class, h_expert = entropy(joint.sum(1)), entropy(joint.sum(0))
    information = mutual_information(joint)
    denominator = h_class + h_expert
    score = min(2.0 * information / denominator, 1.0) if denominator > 1e-12 else 0.0
    return SpecializationScore(
        score=float(score),
        mutual_information_bits=information * to_bits,
        class_entropy_bits=h_class * to_bits,
        expert_entropy_bits=h_expert * to_bits,
        tokens=float(joint.double().sum()),
    )
