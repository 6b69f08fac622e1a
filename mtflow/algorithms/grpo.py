"""GRPO for flow models (Flow-GRPO, docs/design.md section 5): SDE rollouts with exact log-probs, then the clipped
ratio objective on every recorded transition, optionally with a Gaussian-mean KL to the frozen base."""

from __future__ import annotations

from typing import Literal

import torch

from mtflow.advantage import AdvantageResult
from mtflow.algorithms.base import Algorithm, UpdateContext, collect_stats, mean_stats
from mtflow.kernels import grpo_loss
from mtflow.losses import GRPOConfig
from mtflow.rollout import Rollout, TransitionBatch, recompute_transition, transition_batches
from mtflow.sampling import SDEConfig

ReferenceMeans = dict[tuple[int, int, int], torch.Tensor]  # (turn, step, first trajectory) -> [M, L, C]


def _batch_key(batch: TransitionBatch) -> tuple[int, int, int]:
    return (batch.turn, batch.step, batch.trajectories.start)


class GRPO(Algorithm[ReferenceMeans]):
    """Flow-GRPO: on-policy SDE rollouts of the trained adapter, clipped policy-gradient updates."""

    def __init__(
        self,
        noise_level: float = 0.9,
        stochastic: Literal["all", "window"] = "all",
        window_size: int = 2,
        clip_eps: float = 1e-4,
        beta_kl: float = 0.0,
        deterministic_last_step: bool = False,
    ) -> None:
        """
        Args:
            noise_level: SDE noise level a of the rollouts (Flow-GRPO's FLUX configs: 0.9); must be > 0.
            stochastic: SDE (and train) on "all" steps, or on a "window" of ``window_size`` steps drawn per iteration.
            window_size: W, the consecutive SDE steps of window mode.
            clip_eps: the ratio is clipped to [1 - eps, 1 + eps] (Flow-GRPO 1e-4; window mode 1e-5).
            beta_kl: weight of the Gaussian-mean KL to the frozen base (0: no reference passes).
            deterministic_last_step: each turn's last step is an ODE step, not trained on, so the next turn edits a
                noise-free image (as at inference) instead of one carrying the last SDE step's noise.
        """
        if not noise_level > 0:
            raise ValueError(
                f"GRPO needs stochastic (SDE) steps to train on: noise_level must be > 0, got {noise_level} "
                "(NFT, model.algorithm: NFT, trains from deterministic rollouts)"
            )
        self.noise_level = noise_level
        self.stochastic = stochastic
        self.window_size = window_size
        self.clip_eps = clip_eps
        self.beta_kl = beta_kl
        self.deterministic_last_step = deterministic_last_step
        self._sde = SDEConfig(
            noise_level=noise_level,
            stochastic=stochastic,
            window_size=window_size,
            deterministic_last_step=deterministic_last_step,
        )
        self.loss_config = GRPOConfig(clip_eps=clip_eps, beta_kl=beta_kl)

    def sde(self) -> SDEConfig:
        return self._sde

    def prepare(self, ctx: UpdateContext, result: Rollout) -> ReferenceMeans | None:
        """The frozen base's transition means for the KL term (nothing to do without it)."""
        if self.beta_kl <= 0:
            return None
        means = {}
        with ctx.policy.use_adapter(None):
            for batch in transition_batches(result, ctx.rollout_config.forward_batch_size):
                _, mean, _, _ = recompute_transition(ctx.policy, result, batch)
                means[_batch_key(batch)] = mean
        return means

    def update(
        self,
        ctx: UpdateContext,
        result: Rollout,
        adv: AdvantageResult,
        ref_means: ReferenceMeans | None,
    ) -> dict[str, float]:
        """Optimiser steps over the recorded transitions, split by (turn, step) into ``updates_per_rollout`` parts;
        each micro-batch is exactly a rollout batch, so unchanged weights reproduce the recorded log-prob."""
        advantages = adv.advantages.reshape(result.num_trajectories, result.num_turns)
        weights = adv.valid.reshape(result.num_trajectories, result.num_turns).float()
        host_weights = weights.cpu()  # one device sync; the micro-batch shares below are host arithmetic
        batches = transition_batches(result, ctx.rollout_config.forward_batch_size)
        steps = sorted({(b.turn, b.step) for b in batches})
        collected: dict[str, list[torch.Tensor]] = {}
        for chunk in ctx.update_chunks(steps):
            chosen = set(chunk)
            micro = [b for b in batches if (b.turn, b.step) in chosen]
            micro_weights = [float(host_weights[b.trajectories, b.turn].sum()) for b in micro]
            total_weight = sum(micro_weights)
            losses = []
            for batch, batch_weight in zip(micro, micro_weights):
                log_prob, mean, std, _ = recompute_transition(ctx.policy, result, batch)
                ref_mean = ref_means[_batch_key(batch)] if ref_means else None
                loss, stats = grpo_loss(
                    log_prob,
                    result.log_probs[batch.trajectories, batch.turn, batch.step],
                    advantages[batch.trajectories, batch.turn],
                    self.loss_config,
                    weight=weights[batch.trajectories, batch.turn],
                    mean=mean if ref_mean is not None else None,
                    ref_mean=ref_mean,
                    std=std if ref_mean is not None else None,
                    backend=ctx.rollout_config.kernels,
                )
                # Each micro-batch loss is a weighted mean; rescale so the step sees the chunk's weighted mean.
                share = batch_weight / total_weight if total_weight else 0.0
                ctx.accumulate_gradient(loss * share)
                losses.append(loss.detach())
                collect_stats(collected, stats)
            ctx.step_optimizer(losses)
        return mean_stats(collected)
