"""Models built on convmoe: UPerNet with MoE decoders, and classifiers for the engine."""

from convmoe.models.classification import create_classifier, resolve_moe_config
from convmoe.models.encoders import load_encoder_weights
from convmoe.models.upernet import UPerNetMEDoE, UPerNetMoE, replace_conv_with_moe, upernet_moe_config

__all__ = [
    "UPerNetMEDoE",
    "UPerNetMoE",
    "create_classifier",
    "load_encoder_weights",
    "replace_conv_with_moe",
    "resolve_moe_config",
    "upernet_moe_config",
]
