"""The optimiser of the trained adapter and its learning-rate schedule: ``OptimConfig`` (``model.optim.*``).

The schedule is a function of the number of optimiser steps taken, ``lr(step) = lr * multiplier(step)``: linear
warm-up over ``warmup_steps`` steps (the first step already uses ``lr / warmup_steps``, so no step is wasted at
0), then ``constant`` or ``cosine`` decay down to ``min_lr_ratio * lr`` at ``total_steps``. It runs as a
``LambdaLR`` through Lightning's scheduler hooks: Lightning saves its state (the step count) in every checkpoint
and restores it on resume, so the learning rate continues exactly where it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class OptimConfig:
    """AdamW on the trained adapter, its learning-rate schedule, and what happens around each optimiser step.

    Attributes:
        lr: AdamW (peak) learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: clip the total gradient norm to this (0 disables clipping).
        updates_per_rollout: optimiser steps per rollout; the samples are split into this many parts.
        max_nonfinite_skips: abort after this many consecutive iterations whose update was non-finite.
        warmup_steps: optimiser steps of linear warm-up from lr / warmup_steps to lr (0: none).
        schedule: after the warm-up, "constant" (lr) or "cosine" (half a cosine from lr to min_lr_ratio * lr).
        min_lr_ratio: the cosine's final learning rate as a fraction of lr.
        total_steps: optimiser steps the cosine spans, warm-up included (None: model.max_iterations x
            updates_per_rollout).
    """

    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    updates_per_rollout: int = 2
    max_nonfinite_skips: int = 3
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    total_steps: int | None = None

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
        if int(self.warmup_steps) < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"OptimConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.total_steps is not None and int(self.total_steps) <= int(self.warmup_steps):
            raise ValueError(
                f"OptimConfig.total_steps ({self.total_steps}) must exceed warmup_steps ({self.warmup_steps})"
            )

    @property
    def has_schedule(self) -> bool:
        """Whether the learning rate ever differs from ``lr`` (without one no scheduler is built, as before)."""
        return self.warmup_steps > 0 or self.schedule != "constant"

    def resolved_total_steps(self, max_iterations: int | None) -> int | None:
        """``total_steps``, or ``max_iterations x updates_per_rollout`` when it is None (None if both are)."""
        if self.total_steps is not None:
            return int(self.total_steps)
        return None if max_iterations is None else int(max_iterations) * int(self.updates_per_rollout)

    def check_schedule(self, max_iterations: int | None) -> None:
        """Refuse a cosine whose length is unknown or shorter than the warm-up (called by the module at init)."""
        if self.schedule != "cosine":
            return
        total = self.resolved_total_steps(max_iterations)
        if total is None:
            raise ValueError(
                "model.optim.schedule=cosine needs its length: set model.optim.total_steps or model.max_iterations"
            )
        if total <= self.warmup_steps:
            raise ValueError(
                f"model.optim.schedule=cosine spans {total} optimiser steps (max_iterations x updates_per_rollout), "
                f"not more than warmup_steps={self.warmup_steps}"
            )

    def multiplier(self, step: int, total_steps: int | None) -> float:
        """lr(step) / lr after ``step`` optimiser steps have been taken (the factor of the next step)."""
        warmup = int(self.warmup_steps)
        if step < warmup:
            return (step + 1) / warmup
        if self.schedule == "constant":
            return 1.0
        assert total_steps is not None, "check_schedule refuses a cosine of unknown length"
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer, max_iterations: int | None
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """The schedule as a ``LambdaLR`` (stepped once per optimiser step; its state is the step count)."""
        total = self.resolved_total_steps(max_iterations)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.multiplier(step, total))
