"""MoEConfig: every knob of an MoE block, validated, round-tripping through plain dicts and JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from convmoe.dispatch import DISPATCHERS, create_dispatcher
from convmoe.dropout import DROPOUTS
from convmoe.experts import EXPERTS
from convmoe.gates import GATES
from convmoe.losses import LOSSES
from convmoe.registry import Registry
from convmoe.routers import ROUTERS
from convmoe.tokens import TOKENS, create_tokens

_PART_REGISTRIES: dict[str, Registry] = {
    "tokens": TOKENS,
    "router": ROUTERS,
    "gate": GATES,
    "dispatcher": DISPATCHERS,
    "experts": EXPERTS,
    "dropout": DROPOUTS,
}
_REGISTRY_NAMES = {"tokens": "TOKENS", "router": "ROUTERS", "gate": "GATES", "dispatcher": "DISPATCHERS",
                   "experts": "EXPERTS", "dropout": "DROPOUTS"}


@dataclass
class MoEConfig:
    """Configuration of one MoE block.

    Parts (``tokens``, ``router``, ``gate``, ``dispatcher``, ``experts``, ``dropout``) take a registered
    name, as JSON/YAML configs do, or a class; ``to_dict`` writes a class by its registered name.

    Attributes:
        num_experts: Experts E.
        top_k: Experts per token (token choice), or mean experts per token (expert choice capacity).
        tokens: Routing granularity: "pixel", "grid:GxG", "patch:P" or "image".
        router: "token_choice", "expert_choice" or "positional".
        gate: Gate network: "linear", "conv_gap", "positional"; None uses the router's default.
        dispatcher: "sparse" (default; "sparse:pixels", "sparse:regions", "sparse:mixed" force a path)
            or "dense" (the reference).
        experts: "conv" (the replaced conv's geometry) or "residual".
        noise_std: Std of the Gaussian noise added to router logits in training.
        temperature: Router softmax temperature.
        capacity_factor: Expert capacity multiplier; None is unlimited for token choice and 1.25
            for expert choice and the positional router.
        expert_norm: Per-position norm after each conv expert: None or "layer".
        expert_act: Activation after each conv expert: None, "relu", "silu", "gelu".
        shared_expert: Add a dense expert that every token also passes through.
        losses: Balancing loss name -> weight ("switch", "importance", "z", "diversity").
        dropout: Expert-dropout policy: None or "medoe".
        drop_rate: Fraction of experts the dropout policy removes per training pass.
        upcycle_noise_std: Noise (relative to the weight's std) added to each expert when upcycling.
        router_kwargs: Extra keyword arguments for the router (e.g. ``gate_kwargs``).
        expert_kwargs: Extra keyword arguments for the expert bank.

    Example:
        >>> config = MoEConfig(num_experts=4, top_k=1, tokens="grid:3x3")
        >>> MoEConfig.from_dict(config.to_dict()) == config
        True
    """

    num_experts: int = 8
    top_k: int = 2
    tokens: Any = "pixel"
    router: Any = "token_choice"
    gate: Any = None
    dispatcher: Any = "sparse"
    experts: Any = "conv"
    noise_std: float = 0.0
    temperature: float = 1.0
    capacity_factor: float | None = None
    expert_norm: str | None = None
    expert_act: str | None = None
    shared_expert: bool = False
    losses: dict[str, float] = field(default_factory=lambda: {"switch": 0.01})
    dropout: Any = None
    drop_rate: float = 0.0
    upcycle_noise_std: float = 0.0
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    expert_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts!r} must be a positive int.")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k!r} must be in [1, num_experts={self.num_experts}]; "
                             "lower top_k or raise num_experts.")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be >= 0.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0, or None for no limit.")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate={self.drop_rate} must be in [0, 1).")
        if self.drop_rate > 0 and self.dropout is None:
            raise ValueError(f"drop_rate={self.drop_rate} has no effect without a dropout policy; set dropout='medoe'.")
        for name, registry in _PART_REGISTRIES.items():
            value = getattr(self, name)
            if isinstance(value, str):
                base = value.partition(":")[0]
                registry.get(base)  # raises with the list of choices
        if isinstance(self.tokens, str):
            create_tokens(self.tokens)  # parses the argument ("grid:3x3")
        if isinstance(self.dispatcher, str):
            create_dispatcher(self.dispatcher)  # checks a forced path ("sparse:regions")
        for name, weight in self.losses.items():
            LOSSES.get(name)
            if weight < 0:
                raise ValueError(f"loss weight for {name!r} must be >= 0, got {weight}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; a class-valued part is written by its registered name.

        Raises:
            TypeError: A part is an unregistered class or an instance.
        """
        out = dataclasses.asdict(self)
        for name, registry in _PART_REGISTRIES.items():
            value = out[name]
            if value is None or isinstance(value, str):
                continue
            registered = registry.name_of(value) if isinstance(value, type) else None
            if registered is None:
                raise TypeError(f"MoEConfig.{name}={value!r} cannot be written to a config; register it with "
                                f"convmoe.{_REGISTRY_NAMES[name]}.register('name') and use the name.")
            out[name] = registered
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        """Build from a dict; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig keys {unknown}; valid keys: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MoEConfig:
        """Build from a JSON string written by ``to_json``."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with some fields changed (validated again).

        Example:
            >>> MoEConfig().replace(top_k=1).top_k
            1
        """
        return dataclasses.replace(self, **changes)
