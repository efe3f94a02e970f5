"""MoEConfig: every knob of an MoE block, validated, round-tripping through plain dicts and JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from convmoe.dispatch import DISPATCHERS, create_dispatcher
from convmoe.dropout import DROPOUTS
from convmoe.experts import EXPERTS
from convmoe.experts.post import ACTIVATIONS, NORMS
from convmoe.gates import GATES
from convmoe.losses import LOSSES
from convmoe.registry import Registry
from convmoe.routers import ROUTERS, ExpertChoiceRouter
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
_REQUIRED_PARTS = ("tokens", "router", "dispatcher", "experts")


def _is_real(value: Any) -> bool:
    # bool is an int to Python, but num_experts=True or temperature=False is a mistake.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(name: str, value: Any, fix: str) -> int:
    """``value`` as an int, or a TypeError (not a number) / ValueError (a fractional number)."""
    if not _is_real(value):
        raise TypeError(f"MoEConfig.{name}={value!r} ({type(value).__name__}) must be an int; {fix}.")
    if not isinstance(value, numbers.Integral):
        # A value error: JSON and YAML configs have one number type, so 2.5 is a wrong count, not a wrong type.
        raise ValueError(f"{name}={value!r} must be a positive int; {fix}.")  # noqa: TRY004
    return int(value)


def _number(name: str, value: Any, fix: str) -> float:
    """``value`` checked to be a finite real number, or a TypeError / ValueError that says so."""
    if not _is_real(value):
        raise TypeError(f"MoEConfig.{name}={value!r} ({type(value).__name__}) must be a number; {fix}.")
    if not math.isfinite(value):
        raise ValueError(f"MoEConfig.{name}={value!r} must be a finite number; {fix}.")
    return value if isinstance(value, (int, float)) else float(value)  # numpy scalars: plain, for JSON


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
        dispatcher: "sparse" (default; "sparse:merged", "sparse:gathered", "sparse:regions",
            "sparse:deltas" force a path) or "dense" (the reference).
        experts: "conv" (the replaced conv's geometry), "lowrank" (a shared conv plus a rank-r
            delta per expert; ``expert_kwargs={"rank": r}``) or "residual".
        noise_std: Std of the Gaussian noise added to router logits in training.
        temperature: Router softmax temperature.
        capacity_factor: Expert capacity multiplier; None is unlimited for token choice and 1.25
            for expert choice and the positional router.
        expert_norm: Per-position norm after each conv expert: None or "layer".
        expert_act: Activation after each conv expert: None, "relu", "silu", "gelu".
        shared_expert: Add a dense expert that every token also passes through.
        losses: Balancing loss name -> weight ("switch", "importance", "z", "diversity",
            "switch_global").
        bias_balancing: Update rate gamma of auxiliary-loss-free balancing (Wang et al., 2024,
            arXiv:2408.15664): token-choice and positional routers select with a per-expert bias
            that each training pass moves by ``gamma * sign(mean_load - load)``; 0.0 (the default)
            turns it off. Expert choice balances by construction and refuses it.
        dropout: Expert-dropout policy: None or "medoe".
        drop_rate: Fraction of experts the dropout policy removes per training pass; None (the
            default) uses the policy's own default (0.1 for "medoe", as UPerNetMEDoE), 0.0 drops none.
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
    bias_balancing: float = 0.0
    dropout: Any = None
    drop_rate: float | None = None
    upcycle_noise_std: float = 0.0
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    expert_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_sizes()
        self._check_router_numbers()
        self._check_parts()
        self._check_losses()
        self._check_bias_balancing()
        self._check_dropout()
        self.upcycle_noise_std = _number("upcycle_noise_std", self.upcycle_noise_std, "use 0.0 for exact copies")
        if self.upcycle_noise_std < 0:
            raise ValueError(f"upcycle_noise_std={self.upcycle_noise_std} must be >= 0; use 0.0 for exact copies.")
        if not isinstance(self.shared_expert, bool):
            raise TypeError(f"MoEConfig.shared_expert={self.shared_expert!r} must be True or False.")
        for name in ("router_kwargs", "expert_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"MoEConfig.{name}={getattr(self, name)!r} must be a dict of keyword arguments; "
                                "use {} for none.")

    def _check_sizes(self) -> None:
        fix = "e.g. num_experts=8"
        if _integer("num_experts", self.num_experts, fix) < 1:
            raise ValueError(f"num_experts={self.num_experts!r} must be a positive int; {fix}.")
        fix = "lower top_k or raise num_experts"
        if not 1 <= _integer("top_k", self.top_k, fix) <= self.num_experts:
            raise ValueError(f"top_k={self.top_k!r} must be in [1, num_experts={self.num_experts}]; {fix}.")
        self.num_experts, self.top_k = int(self.num_experts), int(self.top_k)  # numpy ints: plain, for JSON

    def _check_router_numbers(self) -> None:
        self.noise_std = _number("noise_std", self.noise_std, "use 0.0 for no router noise")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be >= 0; use 0.0 for no router noise.")
        self.temperature = _number("temperature", self.temperature, "1.0 is the plain softmax")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0; 1.0 is the plain softmax.")
        if self.capacity_factor is not None:
            self.capacity_factor = _number("capacity_factor", self.capacity_factor, "e.g. 1.25, or None for no limit")
            if self.capacity_factor <= 0:
                raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0, or None for no limit.")

    def _check_parts(self) -> None:
        for name in _REQUIRED_PARTS:
            if getattr(self, name) is None:
                raise TypeError(f"MoEConfig.{name}=None: give a registered name "
                                f"({', '.join(_PART_REGISTRIES[name].names())}) or a class.")
        for name, registry in _PART_REGISTRIES.items():
            value = getattr(self, name)
            registry.check_spec(value, f"MoEConfig.{name}")
            if isinstance(value, str):
                base = value.partition(":")[0]
                registry.get(base)  # raises with the list of choices
        if isinstance(self.tokens, str):
            create_tokens(self.tokens)  # parses the argument ("grid:3x3")
        if isinstance(self.dispatcher, str):
            create_dispatcher(self.dispatcher)  # checks a forced path ("sparse:regions")
        for name, what, value, choices in (("expert_norm", "norm", self.expert_norm, NORMS),
                                           ("expert_act", "activation", self.expert_act, sorted(ACTIVATIONS))):
            if value is not None and value not in choices:
                raise ValueError(f"unknown expert {what} {value!r} (MoEConfig.{name}); available: {', '.join(choices)}, "
                                 "or None.")

    def _check_losses(self) -> None:
        if not isinstance(self.losses, dict):
            raise TypeError(f"MoEConfig.losses={self.losses!r} must be a dict of loss name -> weight, e.g. "
                            "{'switch': 0.01}; use {} for no balancing loss.")
        for name, weight in self.losses.items():
            LOSSES.get(name)
            fix = "e.g. 0.01, or leave the loss out"
            if _number(f"losses[{name!r}]", weight, fix) < 0:
                raise ValueError(f"loss weight for {name!r} must be >= 0, got {weight}; {fix}.")

    def _check_bias_balancing(self) -> None:
        fix = "e.g. 0.001, or 0.0 to turn it off"
        self.bias_balancing = _number("bias_balancing", self.bias_balancing, fix)
        if self.bias_balancing < 0:
            raise ValueError(f"bias_balancing={self.bias_balancing} must be >= 0; {fix}.")
        if self.bias_balancing > 0 and (self.router == "expert_choice" or self.router is ExpertChoiceRouter):
            raise ValueError(f"bias_balancing={self.bias_balancing} does not apply to router='expert_choice' (it "
                             "balances load by construction); set bias_balancing=0.0 or use router='token_choice'.")

    def _check_dropout(self) -> None:
        if self.drop_rate is None:
            return
        fix = "e.g. 0.1, or None for the policy's default"
        self.drop_rate = _number("drop_rate", self.drop_rate, fix)
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate={self.drop_rate} must be in [0, 1); {fix}.")
        if self.dropout is None:
            if self.drop_rate > 0:
                raise ValueError(f"drop_rate={self.drop_rate} has no effect without a dropout policy; set "
                                 "dropout='medoe'.")
            self.drop_rate = None  # no policy, no rate: 0.0 (configs saved before None existed) is the default

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
    def coerce(cls, value: MoEConfig | dict[str, Any] | str | None, where: str = "config") -> MoEConfig:
        """The one conversion to an MoEConfig, used by every entry point (``MoEConv2d``, ``patch``,
        ``create_classifier``, ``UPerNetMoE``).

        Args:
            value: An MoEConfig (copied, so the caller's stays unchanged), a dict of its fields
                (optionally with ``"preset"``: a preset name whose fields the others override), a
                preset name, or None for the defaults.
            where: What the value configures, for the error message.

        Raises:
            TypeError: Any other type.
            ValueError: Unknown keys or preset names, invalid values.

        Example:
            >>> MoEConfig.coerce({"preset": "shared_expert_moe", "num_experts": 4}).num_experts
            4
            >>> MoEConfig.coerce("upernet_fusion_moe").top_k, MoEConfig.coerce(None) == MoEConfig()
            (2, True)
        """
        if value is None:
            return cls()
        if isinstance(value, MoEConfig):
            return copy.deepcopy(value)
        if isinstance(value, str | dict):
            from convmoe.presets import get_preset  # presets build MoEConfigs: imported when a name is used

            if isinstance(value, str):
                return get_preset(value)
            fields = dict(value)
            preset = fields.pop("preset", None)
            return get_preset(preset, **fields) if preset is not None else cls.from_dict(fields)
        raise TypeError(f"{where} must be an MoEConfig, a dict of its fields or a preset name, got "
                        f"{type(value).__name__}.")

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
