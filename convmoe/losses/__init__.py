"""Balancing losses: pure functions, a registry and the block's weighted sum."""

from convmoe.losses.balancing import LOSSES, BalancingLoss
from convmoe.losses.functional import diversity_loss, importance_loss, switch_loss, z_loss

__all__ = ["LOSSES", "BalancingLoss", "diversity_loss", "importance_loss", "switch_loss", "z_loss"]
