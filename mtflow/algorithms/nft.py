"""DiffusionNFT (docs/design.md section 6): deterministic rollouts of a slowly following "old" adapter; each turn's
clean output is noised again and the trained adapter is pulled toward the implicit positive policy and away from
the negative one, weighted by the advantage. No log-probs, no SDE needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtflow.advantage import AdvantageResult
from mtflow.algorithms.base import Algorithm, UpdateContext, collect_stats, mean_stats
from mtflow.kernels import nft_loss
from mtflow.losses import NFTConfig, old_adapter_decay, soft_update_
from mtflow.models.base import OLD_ADAPTER, TRAINED_ADAPTER
from mtflow.rollout import Rollout
from mtflow.sampling import SDEConfig


@dataclass
class NFTSamples:
    """Training samples of one NFT iteration: D noised copies of every turn's clean output. M = N * K * D.

    Attributes:
        trajectory, turn: [M] long, which (n, k) each sample comes from.
        sigma: [M] float32 noise level; x_t: [M, L, C] float32 noised latents; x0: [M, L, C] clean latents.
        v_old, v_ref: [M, L, C] float32 velocities of the old adapter and the frozen base (precomputed, no grad).
    """

    trajectory: torch.Tensor
    turn: torch.Tensor
    sigma: torch.Tensor
    x_t: torch.Tensor
    x0: torch.Tensor
    v_old: torch.Tensor
    v_ref: torch.Tensor | None


class NFT(Algorithm[NFTSamples]):
    """DiffusionNFT: rollouts with the "old" adapter, a negative-aware velocity loss on re-noised outputs, and the
    old adapter following the trained one with eta = min(old_adapter_rate * iteration, old_adapter_max_decay)."""

    sampling_adapter = OLD_ADAPTER
    extra_adapters = (OLD_ADAPTER,)

    def __init__(
        self,
        beta: float = 1.0,
        beta_ref: float = 1e-4,
        train_timesteps: int = 1,
        old_adapter_rate: float = 0.001,
        old_adapter_max_decay: float = 0.5,
        rollout_noise_level: float = 0.0,
    ) -> None:
        """
        Args:
            beta: distance of the implicit positive/negative policies from the old one (1; 0.1 for multi-reward runs).
            beta_ref: weight of the squared velocity distance to the frozen base (0: no reference passes).
            train_timesteps: D noised copies per turn output (grid timesteps drawn without replacement); each costs
                an old, a reference and a trained pass: D = 1 keeps NFT >= 2x cheaper than full-SDE GRPO per
                iteration (BENCHMARKS.md), larger D learns more per rollout.
            old_adapter_rate: the old adapter's decay eta grows by this per iteration ...
            old_adapter_max_decay: ... up to this cap.
            rollout_noise_level: SDE noise level of the rollouts on every step (0: deterministic ODE rollouts,
                DiffusionNFT's default).
        """
        if int(train_timesteps) < 1:
            raise ValueError(f"NFT.train_timesteps must be >= 1, got {train_timesteps}")
        if rollout_noise_level < 0:
            raise ValueError(f"NFT.rollout_noise_level must be >= 0, got {rollout_noise_level}")
        old_adapter_decay(0, old_adapter_rate, old_adapter_max_decay)  # validates rate and cap
        self.beta = beta
        self.beta_ref = beta_ref
        self.train_timesteps = train_timesteps
        self.old_adapter_rate = old_adapter_rate
        self.old_adapter_max_decay = old_adapter_max_decay
        self.rollout_noise_level = rollout_noise_level
        NFTConfig(beta=beta, beta_ref=beta_ref)  # validates beta and beta_ref now, not in the first update

    def sde(self) -> SDEConfig | None:
        if self.rollout_noise_level > 0:
            return SDEConfig(noise_level=self.rollout_noise_level, stochastic="all")
        return None

    def loss_config(self, ctx: UpdateContext) -> NFTConfig:
        """The loss settings; a_max is the advantage clip (one value for both)."""
        return NFTConfig(beta=self.beta, a_max=ctx.advantage_config.a_max, beta_ref=self.beta_ref)

    def prepare(self, ctx: UpdateContext, result: Rollout) -> NFTSamples:
        """D noised copies of every (trajectory, turn) clean output, at grid noise levels drawn per chain, with the
        old adapter's and the frozen base's velocities."""
        policy = ctx.policy
        num_steps = ctx.rollout_config.num_steps
        n_total, turns = result.num_trajectories, result.num_turns
        draws = min(self.train_timesteps, num_steps)
        grid = policy.timestep_grid(num_steps, result.image_size)
        trajectory, turn, sigma, noise = [], [], [], []
        for b, chain in enumerate(result.chains):
            gen = ctx.generator("nft", chain.chain_id, host=True)
            for g in range(result.group_size):
                n = b * result.group_size + g
                for k in range(turns):
                    steps = torch.randperm(num_steps, generator=gen)[:draws]
                    trajectory += [n] * draws
                    turn += [k] * draws
                    sigma.append(grid.sigmas[steps.to(grid.sigmas.device)])
                    noise.append(torch.randn((draws, *result.final_latents.shape[2:]), generator=gen))
        trajectory_t = torch.tensor(trajectory, device=ctx.device)
        turn_t = torch.tensor(turn, device=ctx.device)
        sigma_t = torch.cat(sigma).float().to(ctx.device)
        x0 = result.final_latents[trajectory_t, turn_t]
        eps = torch.cat(noise).to(ctx.device)
        s = sigma_t.view(-1, 1, 1)
        x_t = (1 - s) * x0 + s * eps
        v_old = torch.empty_like(x_t)
        v_ref = torch.empty_like(x_t) if self.beta_ref > 0 else None
        size = ctx.rollout_config.forward_batch_size
        for start in range(0, x_t.shape[0], size):
            sl = slice(start, start + size)
            args = (
                x_t[sl],
                sigma_t[sl],
                result.reference_latents[trajectory_t[sl], turn_t[sl]],
                result.text,
                result.text_index[trajectory_t[sl], turn_t[sl]],
                result.image_size,
            )
            with policy.use_adapter(OLD_ADAPTER):
                v_old[sl] = policy.velocity(*args)
            if v_ref is not None:
                with policy.use_adapter(None):
                    v_ref[sl] = policy.velocity(*args)
        assert n_total * turns * draws == x_t.shape[0]
        return NFTSamples(trajectory_t, turn_t, sigma_t, x_t, x0, v_old, v_ref)

    def update(
        self, ctx: UpdateContext, result: Rollout, adv: AdvantageResult, samples: NFTSamples | None
    ) -> dict[str, float]:
        """Optimiser steps over the noised samples, split by draw index (as GRPO splits by timestep), so a step's
        samples do not depend on how chains are spread over ranks."""
        assert samples is not None, "NFT.update needs the samples of NFT.prepare"
        config = self.loss_config(ctx)
        advantages = adv.advantages.reshape(result.num_trajectories, result.num_turns)
        weights = adv.valid.reshape(result.num_trajectories, result.num_turns).float()
        size = ctx.rollout_config.forward_batch_size
        draws = samples.x_t.shape[0] // (result.num_trajectories * result.num_turns)
        draw_of = torch.arange(samples.x_t.shape[0]) % draws  # layout (n, k, d); host arithmetic, no syncs
        sample_weights = weights[
            samples.trajectory, samples.turn
        ].cpu()  # one sync; shares are host arithmetic
        collected: dict[str, list[torch.Tensor]] = {}
        for chunk in ctx.update_chunks(list(range(draws))):
            host_rows = torch.nonzero(torch.isin(draw_of, torch.tensor(chunk))).flatten()
            rows = host_rows.to(samples.x_t.device, non_blocking=True)
            total_weight = float(sample_weights[host_rows].sum())
            losses = []
            for start in range(0, rows.numel(), size):
                idx = rows[start : start + size]
                host_idx = host_rows[start : start + size]
                n, k = samples.trajectory[idx], samples.turn[idx]
                v_theta = ctx.policy.velocity(
                    samples.x_t[idx],
                    samples.sigma[idx],
                    result.reference_latents[n, k],
                    result.text,
                    result.text_index[n, k],
                    result.image_size,
                )
                loss, stats = nft_loss(
                    v_theta,
                    samples.v_old[idx],
                    samples.x_t[idx],
                    samples.x0[idx],
                    samples.sigma[idx],
                    advantages[n, k],
                    config,
                    v_ref=None if samples.v_ref is None else samples.v_ref[idx],
                    weight=weights[n, k],
                    backend=ctx.rollout_config.kernels,
                )
                share = float(sample_weights[host_idx].sum()) / total_weight if total_weight > 0 else 0.0
                ctx.accumulate_gradient(loss * share)
                losses.append(loss.detach())
                collect_stats(collected, stats)
            ctx.step_optimizer(losses)
        stats = mean_stats(collected)
        stats["nft/draws_per_turn"] = float(draws)
        return stats

    def after_update(self, ctx: UpdateContext) -> None:
        """The old (sampling) adapter moves toward the trained one."""
        eta = old_adapter_decay(ctx.iteration, self.old_adapter_rate, self.old_adapter_max_decay)
        soft_update_(
            ctx.policy.adapter_parameters(OLD_ADAPTER), ctx.policy.adapter_parameters(TRAINED_ADAPTER), eta
        )
