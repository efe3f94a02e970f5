"""convmoe: sparse Mixture-of-Experts for convolutional networks."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers see: a package that is also callable (convmoe.patch.CallablePackage)
    from convmoe.patch import CallablePackage

    patch: CallablePackage
else:
    from convmoe import patch  # the package, callable: convmoe.patch(model, targets=...) patches in place
from convmoe.block import MoEConv2d
from convmoe.config import MoEConfig
from convmoe.describe import describe
from convmoe.diagnostics import ModelRoutingStats, aux_loss, compute_stats, moe_blocks, routing_stats
from convmoe.dispatch import DISPATCHERS, create_dispatcher
from convmoe.dropout import DROPOUTS, create_dropout
from convmoe.experts import EXPERTS, create_experts
from convmoe.experts.derived import cached_weights
from convmoe.factory import BaseRecipe, create_model
from convmoe.flops import flops
from convmoe.gates import GATES, create_gate
from convmoe.geometry import ConvGeometry
from convmoe.hub import from_pretrained, save_pretrained
from convmoe.losses import LOSSES
from convmoe.patch import freeze_base, freeze_modules, patch_spec, print_trainable_parameters, unpatch
from convmoe.presets import PRESETS, get_preset, list_presets
from convmoe.registry import Registry
from convmoe.routers import ROUTERS, create_router
from convmoe.tokens import TOKENS, create_tokens
from convmoe.trust import UntrustedCodeError, register_factory
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
    "BaseRecipe",
    "ConvGeometry",
    "MoEConfig",
    "MoEConv2d",
    "ModelRoutingStats",
    "Registry",
    "Routing",
    "RoutingStats",
    "Tokens",
    "UntrustedCodeError",
    "__version__",
    "aux_loss",
    "cached_weights",
    "compute_stats",
    "create_dispatcher",
    "create_dropout",
    "create_experts",
    "create_gate",
    "create_model",
    "create_router",
    "create_tokens",
    "describe",
    "flops",
    "freeze_base",
    "freeze_modules",
    "from_pretrained",
    "get_preset",
    "list_presets",
    "moe_blocks",
    "patch",
    "patch_spec",
    "print_trainable_parameters",
    "register_factory",
    "routing_stats",
    "save_pretrained",
    "unpatch",
]
