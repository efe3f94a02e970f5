"""convmoe: sparse Mixture-of-Experts for convolutional networks."""

from convmoe.block import MoEConv2d
from convmoe.config import MoEConfig
from convmoe.diagnostics import ModelRoutingStats, aux_loss, compute_stats, moe_blocks, routing_stats
from convmoe.dispatch import DISPATCHERS, create_dispatcher
from convmoe.dropout import DROPOUTS, create_dropout
from convmoe.experts import EXPERTS, create_experts
from convmoe.gates import GATES, create_gate
from convmoe.geometry import ConvGeometry
from convmoe.losses import LOSSES
from convmoe.presets import PRESETS, get_preset, list_presets
from convmoe.registry import Registry
from convmoe.routers import ROUTERS, create_router
from convmoe.tokens import TOKENS, create_tokens
from convmoe.types import AuxOutput, Routing, RoutingStats, Tokens

__version__ = "0.1.0"

__all__ = [
    "DISPATCHERS",
    "DROPOUTS",
    "EXPERTS",
    "GATES",
    "LOSSES",
    "PRESETS",
    "ROUTERS",
    "TOKENS",
    "AuxOutput",
    "ConvGeometry",
    "MoEConfig",
    "MoEConv2d",
    "ModelRoutingStats",
    "Registry",
    "Routing",
    "RoutingStats",
    "Tokens",
    "__version__",
    "aux_loss",
    "compute_stats",
    "create_dispatcher",
    "create_dropout",
    "create_experts",
    "create_gate",
    "create_router",
    "create_tokens",
    "get_preset",
    "list_presets",
    "moe_blocks",
    "routing_stats",
]
