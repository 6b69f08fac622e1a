"""The optimiser of the trained adapter: ``OptimConfig`` (``model.optim.*``)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OptimConfig:
    """AdamW on the trained adapter, and what happens around each optimiser step.

    Attributes:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: clip the total gradient norm to this (0 disables clipping).
        updates_per_rollout: optimiser steps per rollout; the samples are split into this many parts.
        max_nonfinite_skips: abort after this many consecutive iterations whose update was non-finite.
    """

    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    updates_per_rollout: int = 2
    max_nonfinite_skips: int = 3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"OptimConfig.lr must be finite and > 0, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(
                f"OptimConfig.weight_decay and max_grad_norm must be >= 0, got {self.weight_decay}, "
                f"{self.max_grad_norm}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two values in [0, 1), got {self.betas}")
        if int(self.updates_per_rollout) < 1:
            raise ValueError(f"OptimConfig.updates_per_rollout must be >= 1, got {self.updates_per_rollout}")
        if int(self.max_nonfinite_skips) < 1:
            raise ValueError(f"OptimConfig.max_nonfinite_skips must be >= 1, got {self.max_nonfinite_skips}")
