"""What an RL algorithm decides, and what it may use of the training loop.

``FlowRLModule`` runs the shared loop (rollout -> score -> advantages -> update, gradient clipping, the non-finite
guard, the EMA adapter, logging, checkpoint state); an ``Algorithm`` decides everything else:

- how its rollouts sample: ``sde()`` (which steps are stochastic, with what noise level; None: deterministic) and
  ``sampling_adapter`` (on-policy "default" or a slowly following "old" adapter);
- which extra LoRA adapters it needs (``extra_adapters``);
- ``prepare``: reward-independent tensors computed without gradients while the judge scores the rollout;
- ``update``: the micro-batch losses and optimiser steps, through the ``UpdateContext``;
- ``after_update``: parameter averaging after the iteration's optimiser steps.

A new algorithm is a subclass whose typed ``__init__`` arguments are exactly its own knobs (each stored under its
own name, so ``config()`` can report them), selected with ``model.algorithm: {class_path: ..., init_args: ...}``.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Generic, Protocol, TypeVar

import torch

from mtflow.advantage import AdvantageConfig, AdvantageResult
from mtflow.models.base import TRAINED_ADAPTER, EditPolicy
from mtflow.rollout import Rollout, RolloutConfig
from mtflow.sampling import SDEConfig

Prepared = TypeVar("Prepared")


class UpdateContext(Protocol):
    """The part of the training loop an algorithm uses (``FlowRLModule`` implements it)."""

    policy: EditPolicy
    rollout_config: RolloutConfig
    advantage_config: AdvantageConfig
    iteration: int  # RL iterations completed before this one

    @property
    def device(self) -> torch.device: ...

    def generator(self, purpose: str, key: str = "", host: bool = False) -> torch.Generator:
        """A generator seeded by (seed, iteration, purpose, key): the same on every rank and after a resume."""
        ...

    def update_chunks(self, keys: list[Any]) -> list[list[Any]]:
        """``keys`` shuffled (the same way on every rank) and split into ``optim.updates_per_rollout`` parts, one per
        optimiser step."""
        ...

    def accumulate_gradient(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (Lightning's ``manual_backward``: precision and strategy aware)."""
        ...

    def step_optimizer(self, losses: list[torch.Tensor]) -> None:
        """Clip, step and zero the gradients, unless some rank saw a non-finite loss or gradient (then skip)."""
        ...


class Algorithm(ABC, Generic[Prepared]):
    """An RL algorithm for flow-matching editors (see the module docstring)."""

    sampling_adapter: str = TRAINED_ADAPTER
    extra_adapters: tuple[str, ...] = ()

    @property
    def algorithm_class(self) -> type[Algorithm]:
        """The algorithm's own class (not jsonargparse's ``lazy_instance`` wrapper around it)."""
        return next(c for c in type(self).__mro__ if issubclass(c, Algorithm) and "__init__" in vars(c))

    @property
    def name(self) -> str:
        return self.algorithm_class.__name__

    @property
    def class_path(self) -> str:
        cls = self.algorithm_class
        return f"{cls.__module__}.{cls.__qualname__}"

    def config(self) -> dict[str, Any]:
        """The ``__init__`` arguments as given (what ``--print_config`` and checkpoints record)."""
        params = inspect.signature(self.algorithm_class.__init__).parameters
        return {name: getattr(self, name) for name in params if name != "self"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"

    @abstractmethod
    def sde(self) -> SDEConfig | None:
        """Which rollout steps are stochastic and recorded (None: deterministic rollouts)."""

    def check(self, rollout: RolloutConfig, advantage: AdvantageConfig) -> None:
        """Refuse settings of the other groups this algorithm cannot work with (called once, by the module)."""
        rollout.check_sde(self.sde())

    def prepare(self, ctx: UpdateContext, result: Rollout) -> Prepared | None:
        """Reward-independent work, run under ``torch.no_grad`` while the judge scores ``result``."""
        return None

    @abstractmethod
    def update(
        self, ctx: UpdateContext, result: Rollout, advantages: AdvantageResult, prepared: Prepared | None
    ) -> dict[str, float]:
        """The iteration's optimiser steps (through ``ctx``); returns slash-namespaced stats."""

    def after_update(self, ctx: UpdateContext) -> None:
        """Called once per iteration after ``update`` (e.g. parameter averaging)."""


# ---------------------------------------------------------------------- micro-batch stats shared by the algorithms
def collect_stats(collected: dict[str, list[torch.Tensor]], stats: dict[str, torch.Tensor]) -> None:
    """Keep the micro-batch stats as detached tensors (no host sync per micro-batch on GPUs)."""
    for key, value in stats.items():
        collected.setdefault(key, []).append(torch.as_tensor(value).detach().float().reshape(()))


def mean_stats(collected: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean of each stat over micro-batches, ignoring NaN entries (one host transfer for all stats)."""
    if not collected:
        return {}
    keys = list(collected)
    values = torch.stack([torch.stack(collected[k]) for k in keys]).double().cpu()  # [num_keys, num_micro]
    finite = torch.isfinite(values)
    counts = finite.sum(dim=1)
    sums = torch.where(finite, values, torch.zeros_like(values)).sum(dim=1)
    return {k: (float(sums[i] / counts[i]) if counts[i] > 0 else float("nan")) for i, k in enumerate(keys)}
