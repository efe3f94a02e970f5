"""Balancing losses: pure functions, a registry and the block's weighted sum."""

from convmoe.losses.balancing import LOSSES, BalancingLoss
from convmoe.losses.functional import (
           diversity_loss,
           first_choice_counts,
           importance_loss,
           switch_loss,
           z_loss,
)
from convmoe.losses.global_batch import FrequencyWindow, global_switch_loss

__all__ = ["LOSSES", "BalancingLoss", "FrequencyWindow", "diversity_loss", "first_choice_counts", "global_switch_loss",
           "importance_loss", "switch_loss", "z_loss"]
